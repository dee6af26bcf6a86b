-- Members removed from a group's conversation, with the seq of the announcement that removed
-- them: they may still read the conversation up to it (a device that missed messages while
-- a member syncs them after its removal). Cleared when the user is added again.
CREATE TABLE former_members (
    conversation_id TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    removed_seq     INTEGER NOT NULL,
    PRIMARY KEY (conversation_id, user_id)
) WITHOUT ROWID;
