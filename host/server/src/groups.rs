//! Groups: the membership cache behind fan-out and access checks, and group requests from
//! validation through the decision (group-policy plugins, else the built-in rules) to the
//! change and its announcement that the pipeline stores.

use std::collections::HashMap;
use std::sync::Arc;

use im_plugins::bindings::group_policy;
use im_plugins::bindings::types::Principal;
use im_plugins::{CallOrigin, GroupOutcome};
use im_proto::ids;
use im_proto::v1::{self, ErrorCode, group_request::Action};
use im_store::{GroupChange, GroupInfo, GroupRole, NewMessage, Store, StoreResult};
use parking_lot::Mutex;

use crate::router::ConnHandle;
use crate::session::{NodeContext, now_ms};

/// Content type of the announcements of group changes in a group's timeline.
pub const GROUP_EVENT_CONTENT_TYPE: &str = "application/vnd.im.group-event+json";
/// Longest group name, in bytes.
const MAX_GROUP_NAME_BYTES: usize = 128;
/// Members read from the store per page when filling the cache.
const MEMBER_PAGE: u32 = 1000;

/// A group's members (user ids, sorted), shared by every reader.
pub type Members = Arc<[Arc<str>]>;

/// Whether `user_id` is among `members`.
pub fn contains(members: &[Arc<str>], user_id: &str) -> bool {
    members.binary_search_by(|u| (**u).cmp(user_id)).is_ok()
}

/// Group memberships, read through from the store and cached per group. The pipeline
/// replaces a group's entry after each change it stores, so the cache never misses a
/// change made on this node.
pub struct GroupDirectory {
    store: Arc<dyn Store>,
    members: Mutex<HashMap<String, Members>>,
}

impl GroupDirectory {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            members: Mutex::default(),
        }
    }

    /// The members of `group_id`, or `None` when the group does not exist.
    pub async fn members(&self, group_id: &str) -> StoreResult<Option<Members>> {
        if let Some(members) = self.members.lock().get(group_id) {
            return Ok(Some(members.clone()));
        }
        let Some(loaded) = self.load(group_id).await? else {
            return Ok(None);
        };
        // A load that raced with a change's refresh must not replace the fresher list.
        let members = self
            .members
            .lock()
            .entry(group_id.to_owned())
            .or_insert(loaded)
            .clone();
        Ok(Some(members))
    }

    /// Whether `user_id` is a member of `group_id` (false when the group does not exist).
    pub async fn is_member(&self, group_id: &str, user_id: &str) -> StoreResult<bool> {
        Ok(self
            .members(group_id)
            .await?
            .is_some_and(|m| contains(&m, user_id)))
    }

    /// Re-reads a group's members after a change.
    pub async fn refresh(&self, group_id: &str) -> StoreResult<Option<Members>> {
        let loaded = match self.load(group_id).await {
            Ok(loaded) => loaded,
            Err(err) => {
                // Not kept stale: the next look-up reads the store again.
                self.members.lock().remove(group_id);
                return Err(err);
            }
        };
        let mut cache = self.members.lock();
        match &loaded {
            Some(members) => cache.insert(group_id.to_owned(), members.clone()),
            None => cache.remove(group_id),
        };
        Ok(loaded)
    }

    async fn load(&self, group_id: &str) -> StoreResult<Option<Members>> {
        if self.store.group(group_id).await?.is_none() {
            return Ok(None);
        }
        let mut all: Vec<Arc<str>> = Vec::new();
        loop {
            let after = all.last().map(|u| u.to_string());
            let page = self
                .store
                .group_members(group_id, after.as_deref(), MEMBER_PAGE)
                .await?;
            let done = page.len() < MEMBER_PAGE as usize;
            all.extend(page.into_iter().map(|m| Arc::from(m.user_id)));
            if done {
                break;
            }
        }
        Ok(Some(all.into()))
    }
}

/// A decided group change, ready for the pipeline to store and announce.
pub struct PreparedChange {
    pub group_id: String,
    pub change: GroupChange,
    pub announcement: NewMessage,
    /// Users the change removes: they get the announcement too.
    pub removed: Vec<String>,
}

/// Why a group request was refused.
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        message: message.into(),
    }
}

fn internal(err: im_store::StoreError) -> Refusal {
    tracing::error!(error = %err, "a group lookup failed");
    refuse(ErrorCode::Internal, "lookup failed; retry")
}

pub fn role_to_proto(role: GroupRole) -> v1::GroupRole {
    match role {
        GroupRole::Owner => v1::GroupRole::Owner,
        GroupRole::Admin => v1::GroupRole::Admin,
        GroupRole::Member => v1::GroupRole::Member,
    }
}

pub fn group_to_proto(group: &GroupInfo) -> v1::Group {
    v1::Group {
        group_id: group.group_id.clone(),
        name: group.name.clone(),
        owner_id: group.owner_id.clone(),
        member_count: group.member_count,
        created_ms: group.created_ms,
    }
}

fn policy_role(role: GroupRole) -> group_policy::Role {
    match role {
        GroupRole::Owner => group_policy::Role::Owner,
        GroupRole::Admin => group_policy::Role::Admin,
        GroupRole::Member => group_policy::Role::Member,
    }
}

/// Who asks for a group change.
#[derive(Clone, Copy)]
pub enum Actor<'a> {
    /// A user over the client protocol: must be a member (but to create or join), and the
    /// group-policy plugins (else the built-in rules) decide.
    User {
        handle: &'a ConnHandle,
        origin: &'a CallOrigin,
    },
    /// A business back-end through the HTTP API, named by its API key: trusted, so no
    /// policy is asked, but the structural checks and limits still apply. It creates
    /// groups for `owner`, and invites and kicks rather than joining or leaving.
    Operator {
        key_name: &'a str,
        owner: Option<&'a str>,
    },
}

impl Actor<'_> {
    /// The user the change is made as (for an operator, the owner of a group it creates).
    fn user_id(&self) -> &str {
        match self {
            Actor::User { handle, .. } => &handle.user_id,
            Actor::Operator { owner, .. } => owner.unwrap_or_default(),
        }
    }

    fn is_user(&self) -> bool {
        matches!(self, Actor::User { .. })
    }
}

/// The sender id of announcements made through the HTTP API with key `key_name`.
pub fn operator_sender_id(key_name: &str) -> String {
    format!("api@{key_name}")
}

/// Checks, decides and prepares a group request from `actor`.
pub async fn prepare(
    ctx: &NodeContext,
    actor: Actor<'_>,
    request: v1::GroupRequest,
) -> Result<PreparedChange, Refusal> {
    let limits = &ctx.config.limits;
    let store = &ctx.store;
    let Some(action) = request.action else {
        return Err(refuse(ErrorCode::InvalidArgument, "no action"));
    };
    let creating = matches!(action, Action::Create(_));
    if let Actor::Operator { owner, .. } = actor {
        if matches!(action, Action::Join(_) | Action::Leave(_)) {
            return Err(refuse(
                ErrorCode::InvalidArgument,
                "an operator invites and kicks; it does not join or leave",
            ));
        }
        if creating && !owner.is_some_and(ids::is_valid_id) {
            return Err(refuse(
                ErrorCode::InvalidArgument,
                "owner_id is not a valid user id",
            ));
        }
    }
    let acting_user = actor.user_id().to_owned();
    let group_id = if creating && request.group_id.is_empty() {
        uuid::Uuid::now_v7().simple().to_string()
    } else {
        request.group_id
    };
    if !ids::is_valid_id(&group_id) {
        return Err(refuse(
            ErrorCode::InvalidArgument,
            "group_id is not a valid id",
        ));
    }
    let group = store.group(&group_id).await.map_err(internal)?;
    let actor_role = match &group {
        Some(_) if actor.is_user() => store
            .group_member(&group_id, &acting_user)
            .await
            .map_err(internal)?
            .map(|m| m.role),
        _ => None,
    };
    match (&group, creating) {
        (Some(_), true) => {
            return Err(refuse(
                ErrorCode::Conflict,
                format!("group {group_id:?} exists"),
            ));
        }
        (None, false) => {
            return Err(refuse(
                ErrorCode::UnknownGroup,
                format!("no group {group_id:?}"),
            ));
        }
        _ => {}
    }
    let users = |list: &[String], what: &str| -> Result<Vec<String>, Refusal> {
        if list.is_empty() {
            return Err(refuse(
                ErrorCode::InvalidArgument,
                format!("{what} lists no users"),
            ));
        }
        if list.len() > limits.max_group_batch {
            return Err(refuse(
                ErrorCode::InvalidArgument,
                format!(
                    "{what} lists {} users; at most {}",
                    list.len(),
                    limits.max_group_batch
                ),
            ));
        }
        if let Some(bad) = list.iter().find(|u| !ids::is_valid_id(u)) {
            return Err(refuse(
                ErrorCode::InvalidArgument,
                format!("{bad:?} is not a valid user id"),
            ));
        }
        let mut list = list.to_vec();
        list.sort();
        list.dedup();
        Ok(list)
    };
    let (change, policy_action, event) = match action {
        Action::Create(create) => {
            if create.name.is_empty() || create.name.len() > MAX_GROUP_NAME_BYTES {
                return Err(refuse(
                    ErrorCode::InvalidArgument,
                    "name must be 1-128 bytes",
                ));
            }
            let mut members = if create.members.is_empty() {
                Vec::new()
            } else {
                users(&create.members, "create")?
            };
            members.retain(|u| *u != acting_user);
            (
                GroupChange::Create {
                    name: create.name.clone(),
                    owner_id: acting_user.clone(),
                    members: members.clone(),
                },
                group_policy::GroupAction::Create((create.name.clone(), members.clone())),
                serde_json::json!({"event": "create", "name": create.name, "users": members}),
            )
        }
        Action::Join(_) => (
            GroupChange::Add {
                user_ids: vec![acting_user.clone()],
            },
            group_policy::GroupAction::Join,
            serde_json::json!({"event": "join", "users": [acting_user]}),
        ),
        Action::Invite(list) => {
            let list = users(&list.user_ids, "invite")?;
            (
                GroupChange::Add {
                    user_ids: list.clone(),
                },
                group_policy::GroupAction::Invite(list.clone()),
                serde_json::json!({"event": "invite", "users": list}),
            )
        }
        Action::Leave(_) => (
            GroupChange::Remove {
                user_ids: vec![acting_user.clone()],
            },
            group_policy::GroupAction::Leave,
            serde_json::json!({"event": "leave", "users": [acting_user]}),
        ),
        Action::Kick(list) => {
            let list = users(&list.user_ids, "kick")?;
            (
                GroupChange::Remove {
                    user_ids: list.clone(),
                },
                group_policy::GroupAction::Kick(list.clone()),
                serde_json::json!({"event": "kick", "users": list}),
            )
        }
        Action::SetRole(change) => {
            let role = match v1::GroupRole::try_from(change.role) {
                Ok(v1::GroupRole::Admin) => GroupRole::Admin,
                Ok(v1::GroupRole::Member) => GroupRole::Member,
                _ => {
                    return Err(refuse(
                        ErrorCode::InvalidArgument,
                        "role must be GROUP_ROLE_ADMIN or GROUP_ROLE_MEMBER (ownership is transferred)",
                    ));
                }
            };
            if !ids::is_valid_id(&change.user_id) {
                return Err(refuse(
                    ErrorCode::InvalidArgument,
                    "user_id is not a valid id",
                ));
            }
            (
                GroupChange::SetRole {
                    user_id: change.user_id.clone(),
                    role,
                },
                group_policy::GroupAction::SetRole(group_policy::RoleChange {
                    user_id: change.user_id.clone(),
                    role: policy_role(role),
                }),
                serde_json::json!({"event": "set_role", "users": [change.user_id], "role": role.as_str()}),
            )
        }
        Action::TransferTo(to) => {
            if !ids::is_valid_id(&to) {
                return Err(refuse(
                    ErrorCode::InvalidArgument,
                    "transfer_to is not a valid id",
                ));
            }
            (
                GroupChange::TransferOwnership { to: to.clone() },
                group_policy::GroupAction::TransferOwnership(to.clone()),
                serde_json::json!({"event": "transfer", "users": [to]}),
            )
        }
    };

    // Structural checks the host always makes, whatever the policy says.
    let joining = matches!(policy_action, group_policy::GroupAction::Join);
    if joining && actor_role.is_some() {
        return Err(refuse(ErrorCode::Conflict, "you are already a member"));
    }
    if actor.is_user() && !creating && !joining && actor_role.is_none() {
        return Err(refuse(
            ErrorCode::NotAMember,
            "you are not a member of this group",
        ));
    }
    let mut added: Vec<String> = match &change {
        GroupChange::Create { members, .. } => members.clone(),
        GroupChange::Add { user_ids } => user_ids.clone(),
        _ => Vec::new(),
    };
    if creating && !actor.is_user() {
        // An operator's owner must exist like any member; a user's own login proves it.
        added.push(acting_user.clone());
    }
    for user in &added {
        match ctx.known_users.exists(user).await {
            Ok(true) => {}
            Ok(false) => return Err(refuse(ErrorCode::UnknownUser, format!("no user {user:?}"))),
            Err(err) => return Err(internal(err)),
        }
    }
    // Invitations and kicks must change something for each user they name, so the
    // announcement says what really happened.
    if !creating && !joining {
        let must_be_member = match &change {
            GroupChange::Add { .. } => Some(false),
            GroupChange::Remove { .. } => Some(true),
            _ => None,
        };
        if let (
            Some(must_be_member),
            GroupChange::Add { user_ids } | GroupChange::Remove { user_ids },
        ) = (must_be_member, &change)
        {
            for user in user_ids {
                let member = store
                    .group_member(&group_id, user)
                    .await
                    .map_err(internal)?
                    .is_some();
                if member != must_be_member {
                    let state = if member {
                        "already a member"
                    } else {
                        "not a member"
                    };
                    return Err(refuse(ErrorCode::Conflict, format!("{user:?} is {state}")));
                }
            }
        }
    }
    let current = group.as_ref().map_or(0, |g| g.member_count as usize);
    let new_size = match &change {
        GroupChange::Create { members, .. } => members.len() + 1,
        GroupChange::Add { user_ids } => current + user_ids.len(),
        _ => current,
    };
    if new_size > limits.max_group_members {
        return Err(refuse(
            ErrorCode::Conflict,
            format!(
                "the group would have more than {} members",
                limits.max_group_members
            ),
        ));
    }

    // The decision: the group-policy chain, or the built-in rules without one. An
    // operator's change is decided by the operator.
    if let Actor::User { handle, origin } = actor {
        let policy_request = group_policy::GroupRequest {
            actor: Principal {
                user_id: handle.user_id.to_string(),
                device_id: handle.device_id.to_string(),
            },
            actor_role: actor_role.map(policy_role),
            group: group.as_ref().map(|g| group_policy::Group {
                group_id: g.group_id.clone(),
                name: g.name.clone(),
                owner: g.owner_id.clone(),
                member_count: g.member_count,
            }),
            action: policy_action,
        };
        let outcome = match &ctx.plugins {
            Some(plugins) => plugins.decide_group(origin, policy_request).await,
            None => GroupOutcome::NoPlugins,
        };
        match outcome {
            GroupOutcome::Allow => {}
            GroupOutcome::Deny { reason } => return Err(refuse(ErrorCode::Rejected, reason)),
            GroupOutcome::NoPlugins => {
                if let Err(reason) = built_in_rule(&acting_user, actor_role, &change) {
                    return Err(refuse(ErrorCode::Rejected, reason));
                }
            }
        }
    }

    let removed = match &change {
        GroupChange::Remove { user_ids } => user_ids.clone(),
        _ => Vec::new(),
    };
    let server_msg_id = uuid::Uuid::now_v7().to_string();
    let (sender_id, sender_device_id) = match actor {
        Actor::User { handle, .. } => (handle.user_id.to_string(), handle.device_id.to_string()),
        Actor::Operator { key_name, .. } => (operator_sender_id(key_name), "api".to_owned()),
    };
    let mut event = event;
    event["actor"] = serde_json::Value::String(sender_id.clone());
    let announcement = NewMessage {
        conversation_id: ids::group_conversation_id(&group_id),
        sender_id,
        sender_device_id,
        recipient_id: group_id.clone(),
        client_msg_id: format!("group-event:{server_msg_id}"),
        body: event.to_string().into(),
        content_type: GROUP_EVENT_CONTENT_TYPE.into(),
        server_msg_id,
        server_time_ms: now_ms(),
    };
    Ok(PreparedChange {
        group_id,
        change,
        announcement,
        removed,
    })
}

/// The rules applied while no group-policy plugin is enabled: anyone creates and joins
/// (groups are open), members invite and leave, the owner and admins remove members, and
/// only the owner changes roles and transfers ownership.
fn built_in_rule(actor: &str, role: Option<GroupRole>, change: &GroupChange) -> Result<(), String> {
    match change {
        GroupChange::Create { .. } | GroupChange::Add { .. } => Ok(()),
        GroupChange::Remove { user_ids } if user_ids.len() == 1 && user_ids[0] == actor => Ok(()),
        GroupChange::Remove { .. } => match role {
            Some(GroupRole::Owner) | Some(GroupRole::Admin) => Ok(()),
            _ => Err("only the owner and admins remove members".into()),
        },
        GroupChange::SetRole { .. } | GroupChange::TransferOwnership { .. } => match role {
            Some(GroupRole::Owner) => Ok(()),
            _ => Err("only the owner changes roles and ownership".into()),
        },
    }
}
