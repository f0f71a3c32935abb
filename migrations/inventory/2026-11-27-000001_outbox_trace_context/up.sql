-- The W3C traceparent of the span that wrote the event, so the relay can put it
-- in the message headers and the event joins the purchase's trace. NULL when
-- tracing is off.
ALTER TABLE outbox ADD COLUMN traceparent TEXT
    CHECK (traceparent IS NULL OR length(traceparent) <= 128);
