-- Groups. The owner is also a row of group_members; member_count mirrors that table's rows
-- for the group, so reading a group never counts its members.
CREATE TABLE groups (
    group_id     TEXT PRIMARY KEY NOT NULL,
    name         TEXT NOT NULL,
    owner_id     TEXT NOT NULL,
    member_count INTEGER NOT NULL,
    created_ms   INTEGER NOT NULL
) WITHOUT ROWID;

-- A group's members with their role ('owner', 'admin' or 'member'). Each member also has a
-- conversation_members row for the group's conversation 'g:<group_id>' (its read cursor).
CREATE TABLE group_members (
    group_id  TEXT NOT NULL,
    user_id   TEXT NOT NULL,
    role      TEXT NOT NULL,
    joined_ms INTEGER NOT NULL,
    PRIMARY KEY (group_id, user_id)
) WITHOUT ROWID;

-- A user's groups, in group id order.
CREATE INDEX group_members_by_user ON group_members (user_id, group_id);
