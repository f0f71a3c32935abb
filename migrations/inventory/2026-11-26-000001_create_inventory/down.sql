DROP TABLE outbox;
DROP TABLE holdings;
DROP TABLE orders;
DROP TABLE items;
