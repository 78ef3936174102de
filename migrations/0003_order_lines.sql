-- Schema version 3: `order_by` lines.

-- A pair of a handler with `order_by`: the line it waits in (hex of the first 16 bytes of
-- SHA-256 of the value) and its place there (received_at). In a line, the pairs that are
-- not final run one at a time in `(order_at_ms, source, id)` order: the active one has a
-- `due_ms`, the others wait with none (parked), so a long line costs the dispatcher
-- nothing. Every change to a line happens under its transaction-scoped advisory lock.
ALTER TABLE inbox_jobs ADD COLUMN order_key text;
ALTER TABLE inbox_jobs ADD COLUMN order_at_ms bigint;
CREATE INDEX inbox_jobs_order_lines ON inbox_jobs (handler, order_key, order_at_ms, source, id)
    WHERE order_key IS NOT NULL AND status NOT IN ('succeeded', 'dead');
