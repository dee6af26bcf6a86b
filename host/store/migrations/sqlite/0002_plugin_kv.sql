-- Key-value data of plugins, by plugin id (kept across plugin upgrades).
CREATE TABLE plugin_kv (
    plugin_id     TEXT NOT NULL,
    key           TEXT NOT NULL,
    value         BLOB NOT NULL,
    expires_at_ms INTEGER,
    PRIMARY KEY (plugin_id, key)
) WITHOUT ROWID;
