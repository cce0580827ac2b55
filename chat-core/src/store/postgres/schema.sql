-- The chat history store in PostgreSQL, schema version 1, run in the store's own schema
-- (written `chat_schema` here and replaced at start) inside a transaction that holds an
-- advisory lock, so that nodes starting together migrate once. Every statement is idempotent.

CREATE SCHEMA IF NOT EXISTS chat_schema;
SET LOCAL search_path TO chat_schema;

CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text NOT NULL);

-- Each conversation's newest id: an append takes last_id + 1 while it holds the row locked until
-- its transaction commits, so a conversation's ids commit in id order on every node. Retention
-- has deleted every id up to trimmed_through.
CREATE TABLE IF NOT EXISTS conversations (
    key text PRIMARY KEY,
    last_id bigint NOT NULL,
    trimmed_through bigint NOT NULL DEFAULT 0
);
ALTER TABLE conversations ADD COLUMN IF NOT EXISTS trimmed_through bigint NOT NULL DEFAULT 0;

CREATE TABLE IF NOT EXISTS messages (
    conversation text NOT NULL,
    id bigint NOT NULL,
    sender text NOT NULL,
    recipient text,
    body text NOT NULL,
    ts bigint NOT NULL,
    PRIMARY KEY (conversation, id)
);
CREATE INDEX IF NOT EXISTS messages_by_ts ON messages (ts);

-- Retries: the first message stored under each (conversation, sender, ref).
CREATE TABLE IF NOT EXISTS refs (
    conversation text NOT NULL,
    sender text NOT NULL,
    ref text NOT NULL,
    id bigint NOT NULL,
    ts bigint NOT NULL,
    PRIMARY KEY (conversation, sender, ref)
);
CREATE INDEX IF NOT EXISTS refs_by_ts ON refs (ts);

CREATE TABLE IF NOT EXISTS reads (
    reader text NOT NULL,
    conversation text NOT NULL,
    id bigint NOT NULL,
    PRIMARY KEY (reader, conversation)
);

-- Each user's direct conversations, for the inbox; recency orders them.
CREATE TABLE IF NOT EXISTS partners (
    owner text NOT NULL,
    partner text NOT NULL,
    conversation text NOT NULL,
    recency bigint NOT NULL,
    PRIMARY KEY (owner, partner)
);
CREATE SEQUENCE IF NOT EXISTS recency;

-- One group commit: every request of a batch in one call and one transaction. `in_kinds` says
-- what each is: 'a' an append (of sender, recipient, body, ts, ref, direct), 'r' a read position
-- (reader in in_senders, the id in in_tss). One row comes back per request, in order: the id (the
-- position, for reads), whether the append was a retry, and the stored message (for a retry, the
-- first copy's).
--
-- Locks are always taken in key order (conversation counters, then read positions), so batches of
-- different nodes wait for each other and never deadlock. The loop only numbers the appends and
-- spots retries; every table is written by one statement per batch.
CREATE OR REPLACE FUNCTION write_batch(
    in_kinds text[],
    in_conversations text[],
    in_senders text[],
    in_recipients text[],
    in_bodies text[],
    in_tss bigint[],
    in_refs text[],
    in_directs boolean[],
    in_window bigint,
    in_retention bigint
) RETURNS TABLE (
    out_id bigint,
    out_duplicate boolean,
    out_sender text,
    out_recipient text,
    out_body text,
    out_ts bigint
)
LANGUAGE plpgsql
SET search_path = chat_schema
AS $$
DECLARE
    n int := coalesce(array_length(in_kinds, 1), 0);
    keys text[];
    first_lasts bigint[];
    lasts bigint[];
    found_at int[];
    found_ids bigint[];
    found_ts bigint[];
    -- This batch's stored appends with a ref: the key, and where in the batch.
    batch_refs text[] := '{}';
    batch_ref_at int[] := '{}';
    ids bigint[] := array_fill(0::bigint, ARRAY[n]);
    dups boolean[] := array_fill(false, ARRAY[n]);
    senders_out text[] := in_senders;
    recipients_out text[] := in_recipients;
    bodies_out text[] := in_bodies;
    tss_out bigint[] := in_tss;
    stored boolean[] := array_fill(false, ARRAY[n]);
    recency_base bigint;
    k int;
    p int;
    j int;
    ref_key text;
    earlier_id bigint;
    earlier_ts bigint;
    original record;
BEGIN
    -- Lock every conversation this batch appends to, in key order; read each counter once.
    SELECT array_agg(DISTINCT c ORDER BY c) INTO keys
      FROM unnest(in_conversations, in_kinds) AS x(c, kind) WHERE kind = 'a';
    IF keys IS NOT NULL THEN
        INSERT INTO conversations (key, last_id)
            SELECT c, 0 FROM unnest(keys) AS c ORDER BY c
            ON CONFLICT (key) DO NOTHING;
        SELECT array_agg(c.last_id ORDER BY c.key) INTO first_lasts
          FROM (SELECT key, last_id FROM conversations WHERE key = ANY (keys)
                ORDER BY key FOR UPDATE) c;
        lasts := first_lasts;
    END IF;

    -- Earlier copies of this batch's refs, in one lookup.
    SELECT array_agg(r.ord::int), array_agg(f.id), array_agg(f.ts)
      INTO found_at, found_ids, found_ts
      FROM unnest(in_conversations, in_senders, in_refs, in_kinds)
             WITH ORDINALITY AS r(c, s, ref, kind, ord)
      JOIN refs f ON f.conversation = r.c AND f.sender = r.s AND f.ref = r.ref
     WHERE r.kind = 'a' AND r.ref IS NOT NULL;

    FOR i IN 1 .. n LOOP
        CONTINUE WHEN in_kinds[i] <> 'a';
        earlier_id := NULL;
        j := NULL;
        IF in_refs[i] IS NOT NULL THEN
            ref_key := in_conversations[i] || chr(31) || in_senders[i] || chr(31) || in_refs[i];
            p := array_position(batch_refs, ref_key);
            IF p IS NOT NULL THEN
                j := batch_ref_at[p];
                earlier_id := ids[j]; earlier_ts := in_tss[j];
            ELSE
                p := array_position(found_at, i);
                IF p IS NOT NULL THEN
                    earlier_id := found_ids[p]; earlier_ts := found_ts[p];
                END IF;
            END IF;
            IF earlier_id IS NOT NULL AND (in_window <= 0 OR in_tss[i] - earlier_ts >= in_window) THEN
                earlier_id := NULL;
                j := NULL;
            END IF;
        END IF;

        IF earlier_id IS NOT NULL THEN
            ids[i] := earlier_id; dups[i] := true;
            IF j IS NOT NULL THEN
                -- The first copy is in this batch.
                senders_out[i] := in_senders[j]; recipients_out[i] := in_recipients[j];
                bodies_out[i] := in_bodies[j]; tss_out[i] := in_tss[j];
            ELSE
                tss_out[i] := earlier_ts;
                SELECT m.sender, m.recipient, m.body, m.ts INTO original FROM messages m
                    WHERE m.conversation = in_conversations[i] AND m.id = earlier_id;
                -- Retention may have dropped the original; the retry carries the same content.
                IF FOUND THEN
                    senders_out[i] := original.sender; recipients_out[i] := original.recipient;
                    bodies_out[i] := original.body; tss_out[i] := original.ts;
                END IF;
            END IF;
            CONTINUE;
        END IF;

        k := array_position(keys, in_conversations[i]);
        lasts[k] := lasts[k] + 1;
        ids[i] := lasts[k];
        stored[i] := true;
        IF in_refs[i] IS NOT NULL THEN
            batch_refs := batch_refs || ref_key;
            batch_ref_at := batch_ref_at || i;
        END IF;
    END LOOP;

    -- Read positions, set-based and in key order; each request gets its position after the batch.
    IF 'r' = ANY (in_kinds) THEN
        WITH moved AS (
            INSERT INTO reads AS r (reader, conversation, id)
                SELECT DISTINCT ON (reader, conversation) reader, conversation, id
                  FROM unnest(in_senders, in_conversations, in_tss, in_kinds)
                       AS x(reader, conversation, id, kind)
                 WHERE kind = 'r'
                 ORDER BY reader, conversation, id DESC
                ON CONFLICT (reader, conversation) DO UPDATE SET id = greatest(r.id, excluded.id)
                RETURNING r.reader, r.conversation, r.id
        )
        SELECT array_agg(CASE WHEN x.kind = 'r' THEN m.id ELSE x.id END ORDER BY x.ord)
          INTO ids
          FROM unnest(in_kinds, in_senders, in_conversations, ids)
               WITH ORDINALITY AS x(kind, reader, conversation, id, ord)
          LEFT JOIN moved m ON x.kind = 'r' AND m.reader = x.reader
                           AND m.conversation = x.conversation;
    END IF;

    IF keys IS NOT NULL THEN
        INSERT INTO messages (conversation, id, sender, recipient, body, ts)
            SELECT c, id, s, rcpt, b, t
              FROM unnest(in_conversations, ids, in_senders, in_recipients, in_bodies, in_tss,
                          stored) AS x(c, id, s, rcpt, b, t, keep)
             WHERE keep;
        -- The newest of each ref: with no window a batch may store one ref twice.
        INSERT INTO refs AS f (conversation, sender, ref, id, ts)
            SELECT DISTINCT ON (c, s, ref) c, s, ref, id, t
              FROM unnest(in_conversations, in_senders, in_refs, ids, in_tss, stored)
                   AS x(c, s, ref, id, t, keep)
             WHERE keep AND ref IS NOT NULL
             ORDER BY c, s, ref, id DESC
            ON CONFLICT (conversation, sender, ref) DO UPDATE SET id = excluded.id, ts = excluded.ts;
        -- Both sides of each direct conversation, at its newest message: one sequence number
        -- per batch, and the batch position below it, so later in the batch is more recent.
        IF true = ANY (in_directs) THEN
            recency_base := nextval('recency') * 10000;
            INSERT INTO partners AS p (owner, partner, conversation, recency)
                SELECT DISTINCT ON (side.owner, side.partner)
                       side.owner, side.partner, x.c, recency_base + x.ord
                  FROM unnest(in_senders, in_recipients, in_conversations, in_directs, stored)
                       WITH ORDINALITY AS x(s, rcpt, c, direct, keep, ord)
                 CROSS JOIN LATERAL (VALUES (x.s, x.rcpt), (x.rcpt, x.s)) AS side(owner, partner)
                 WHERE x.keep AND x.direct
                 ORDER BY side.owner, side.partner, x.ord DESC
                ON CONFLICT (owner, partner) DO UPDATE SET recency = excluded.recency;
        END IF;
        -- The new counters, and retention: delete exactly the ids that fell out since the last
        -- trim (a bounded range, so the delete never walks the dead rows of earlier ones, and a
        -- retention lowered since then catches up).
        WITH counters AS (
            UPDATE conversations c
               SET last_id = greatest(c.last_id, x.last_id),
                   trimmed_through = greatest(c.trimmed_through, x.last_id - in_retention)
              FROM unnest(keys, lasts) AS x(key, last_id)
             WHERE c.key = x.key
         RETURNING c.key, c.trimmed_through AS now_through
        ), before AS (
            SELECT c.key, c.trimmed_through AS was_through
              FROM conversations c WHERE c.key = ANY (keys)
        )
        DELETE FROM messages m
         USING counters x JOIN before b ON b.key = x.key
         WHERE m.conversation = x.key
           AND m.id > b.was_through
           AND m.id <= x.now_through;
    END IF;

    RETURN QUERY
        SELECT x.id, x.dup, x.s, x.rcpt, x.b, x.t
          FROM unnest(ids, dups, senders_out, recipients_out, bodies_out, tss_out)
               WITH ORDINALITY AS x(id, dup, s, rcpt, b, t, ord)
         ORDER BY x.ord;
END;
$$;
