DROP INDEX orders_item_user_key;
