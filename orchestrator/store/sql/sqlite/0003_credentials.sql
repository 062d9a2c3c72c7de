-- Credentials, sealed (orchestrator/sealing.py): one row per connection, never in the clear.
-- Written in the transaction of the record that brought them (credentials-updated), deleted in
-- the transaction that appends credentials-destroyed (crypto-shredding).

CREATE TABLE credentials (
    stream      TEXT    PRIMARY KEY,   -- environment/integration/connection_id
    incarnation INTEGER NOT NULL,      -- bound into the ciphertext's associated data, with the stream
    key_id      TEXT    NOT NULL,      -- the key it is sealed under (a short hash of the key)
    nonce       BLOB    NOT NULL,      -- 12 bytes, random per seal
    ciphertext  BLOB    NOT NULL,      -- AES-256-GCM, tag included
    fingerprint TEXT    NOT NULL,      -- keyed (HMAC-SHA256), as its credentials-updated record states it
    version     INTEGER NOT NULL,      -- the stream version of that record
    updated_at  INTEGER NOT NULL       -- microseconds since the epoch
) WITHOUT ROWID;

CREATE INDEX credentials_by_key ON credentials (key_id);
