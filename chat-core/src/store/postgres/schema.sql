-- The chat history store in PostgreSQL, schema version 1, run in the store's own schema
-- (written `chat_schema` here and replaced at start) inside a transaction that holds an
-- advisory lock, so that nodes starting together migrate once. Every statement is idempotent.

CREATE SCHEMA IF NOT EXISTS chat_schema;
SET LOCAL search_path TO chat_schema;

CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text NOT NULL);

-- Each conversation's newest id: an append takes last_id + 1 while it holds the row locked until
-- its transaction commits, so a conversation's ids commit in id order on every node.
CREATE TABLE IF NOT EXISTS conversations (
    key text PRIMARY KEY,
    last_id bigint NOT NULL
);

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
-- position, for reads), whether the append was a retry, and the stored message.
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
    appended text[];
    earlier record;
    original record;
    new_id bigint;
    rank bigint;
BEGIN
    -- Lock every conversation this batch appends to, always in key order, so batches of
    -- different nodes wait for each other instead of deadlocking.
    SELECT array_agg(DISTINCT c ORDER BY c) INTO appended
      FROM unnest(in_conversations, in_kinds) AS x(c, k) WHERE k = 'a';
    IF appended IS NOT NULL THEN
        INSERT INTO conversations (key, last_id)
            SELECT c, 0 FROM unnest(appended) AS c ORDER BY c
            ON CONFLICT (key) DO NOTHING;
        PERFORM 1 FROM conversations WHERE key = ANY (appended) ORDER BY key FOR UPDATE;
    END IF;

    FOR i IN 1 .. n LOOP
        IF in_kinds[i] = 'r' THEN
            INSERT INTO reads AS r (reader, conversation, id)
                VALUES (in_senders[i], in_conversations[i], in_tss[i])
                ON CONFLICT (reader, conversation) DO UPDATE SET id = greatest(r.id, excluded.id)
                RETURNING r.id INTO new_id;
            out_id := new_id; out_duplicate := false;
            out_sender := NULL; out_recipient := NULL; out_body := NULL; out_ts := NULL;
            RETURN NEXT;
            CONTINUE;
        END IF;

        IF in_refs[i] IS NOT NULL THEN
            SELECT f.id, f.ts INTO earlier FROM refs f
                WHERE f.conversation = in_conversations[i] AND f.sender = in_senders[i]
                  AND f.ref = in_refs[i];
            IF FOUND AND earlier.ts + in_window > in_tss[i] THEN
                SELECT m.sender, m.recipient, m.body, m.ts INTO original FROM messages m
                    WHERE m.conversation = in_conversations[i] AND m.id = earlier.id;
                out_id := earlier.id; out_duplicate := true;
                IF FOUND THEN
                    out_sender := original.sender; out_recipient := original.recipient;
                    out_body := original.body; out_ts := original.ts;
                ELSE
                    -- Retention dropped the original; the retry carries the same content.
                    out_sender := in_senders[i]; out_recipient := in_recipients[i];
                    out_body := in_bodies[i]; out_ts := earlier.ts;
                END IF;
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;

        UPDATE conversations SET last_id = last_id + 1 WHERE key = in_conversations[i]
            RETURNING last_id INTO new_id;
        INSERT INTO messages (conversation, id, sender, recipient, body, ts)
            VALUES (in_conversations[i], new_id, in_senders[i], in_recipients[i], in_bodies[i], in_tss[i]);
        IF in_refs[i] IS NOT NULL THEN
            INSERT INTO refs AS f (conversation, sender, ref, id, ts)
                VALUES (in_conversations[i], in_senders[i], in_refs[i], new_id, in_tss[i])
                ON CONFLICT (conversation, sender, ref)
                DO UPDATE SET id = excluded.id, ts = excluded.ts;
        END IF;
        IF in_directs[i] THEN
            rank := nextval('recency');
            INSERT INTO partners AS p (owner, partner, conversation, recency)
                VALUES (in_senders[i], in_recipients[i], in_conversations[i], rank),
                       (in_recipients[i], in_senders[i], in_conversations[i], rank)
                ON CONFLICT (owner, partner) DO UPDATE SET recency = excluded.recency;
        END IF;
        out_id := new_id; out_duplicate := false;
        out_sender := in_senders[i]; out_recipient := in_recipients[i];
        out_body := in_bodies[i]; out_ts := in_tss[i];
        RETURN NEXT;
    END LOOP;

    IF appended IS NOT NULL THEN
        DELETE FROM messages m USING conversations c
            WHERE c.key = ANY (appended) AND m.conversation = c.key
              AND m.id <= c.last_id - in_retention;
    END IF;
END;
$$;
