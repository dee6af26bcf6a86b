//! Group-policy plugin: the rules of groups; the host stores membership and delivers.
//!
//! - create: allowed for the configured creators, within `max_members`, with a name of
//!   1-64 characters;
//! - join: only for `join = "open"` groups that are not full;
//! - invite: by the owner and admins (or any member with `inviters = "members"`), within
//!   `max_members`;
//! - leave: anyone but the owner, who must transfer ownership first;
//! - kick: by the owner and admins, never the owner, never oneself;
//! - role changes and ownership transfer: by the owner only (ownership moves only by transfer).

use im_plugin_sdk::groups::{GroupAction, GroupDecision, GroupPolicy, GroupRequest, Role};
use im_plugin_sdk::{CallContext, config};

/// The configured rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    pub max_members: u32,
    /// `None`: anyone may create.
    pub creators: Option<Vec<String>>,
    pub open_join: bool,
    pub members_invite: bool,
}

impl Rules {
    fn from_config() -> Self {
        let creators = config::get_or("creators", "anyone");
        Self {
            max_members: config::get_or("max_members", "500").parse().unwrap_or(500),
            creators: (creators != "anyone").then(|| {
                creators
                    .split(',')
                    .map(|s| s.trim().to_owned())
                    .filter(|s| !s.is_empty())
                    .collect()
            }),
            open_join: config::get_or("join", "invite") == "open",
            members_invite: config::get_or("inviters", "admins") == "members",
        }
    }

    /// The decision for `request`: `Ok(())` to allow, `Err(reason)` to deny.
    pub fn decide(&self, request: &GroupRequest) -> Result<(), String> {
        let actor = request.actor.user_id.as_str();
        let role = request.actor_role;
        let is_manager = matches!(role, Some(Role::Owner | Role::Admin));
        let size = request.group.as_ref().map_or(0, |g| g.member_count);
        let owner = request.group.as_ref().map(|g| g.owner.as_str());
        let fits = |added: usize| {
            if size as usize + added <= self.max_members as usize {
                Ok(())
            } else {
                Err(format!(
                    "the group would exceed {} members",
                    self.max_members
                ))
            }
        };
        match &request.action {
            GroupAction::Create((name, members)) => {
                if let Some(creators) = &self.creators
                    && !creators.iter().any(|c| c == actor)
                {
                    return Err(format!("{actor} may not create groups"));
                }
                let length = name.chars().count();
                if !(1..=64).contains(&length) {
                    return Err("a group name has 1 to 64 characters".into());
                }
                fits(1 + members.len())
            }
            _ if request.group.is_none() => Err("no such group".into()),
            GroupAction::Join => {
                if role.is_some() {
                    return Err("already a member".into());
                }
                if !self.open_join {
                    return Err("this group is invite-only".into());
                }
                fits(1)
            }
            GroupAction::Invite(users) => {
                if role.is_none() || !(is_manager || self.members_invite) {
                    return Err("only the owner and admins may invite".into());
                }
                fits(users.len())
            }
            GroupAction::Leave => match role {
                None => Err("not a member".into()),
                Some(Role::Owner) => Err("the owner must transfer ownership before leaving".into()),
                Some(_) => Ok(()),
            },
            GroupAction::Kick(users) => {
                if !is_manager {
                    return Err("only the owner and admins may remove members".into());
                }
                if users.iter().any(|u| Some(u.as_str()) == owner) {
                    return Err("the owner cannot be removed".into());
                }
                if users.iter().any(|u| u == actor) {
                    return Err("leave instead of removing yourself".into());
                }
                Ok(())
            }
            GroupAction::SetRole(change) => {
                if role != Some(Role::Owner) {
                    return Err("only the owner may change roles".into());
                }
                if change.role == Role::Owner {
                    return Err("ownership moves only by transfer".into());
                }
                if change.user_id == actor {
                    return Err("the owner's own role does not change".into());
                }
                Ok(())
            }
            GroupAction::TransferOwnership(to) => {
                if role != Some(Role::Owner) {
                    return Err("only the owner may transfer ownership".into());
                }
                if to == actor {
                    return Err("already the owner".into());
                }
                Ok(())
            }
        }
    }
}

struct Policy;

impl GroupPolicy for Policy {
    fn decide(_ctx: &CallContext, request: GroupRequest) -> GroupDecision {
        match Rules::from_config().decide(&request) {
            Ok(()) => GroupDecision::Allow,
            Err(reason) => GroupDecision::Deny(reason),
        }
    }
}

im_plugin_sdk::export_group_policy!(Policy);

#[cfg(test)]
mod tests {
    use super::*;
    use im_plugin_sdk::Principal;
    use im_plugin_sdk::groups::{Group, RoleChange};

    fn rules() -> Rules {
        Rules {
            max_members: 3,
            creators: None,
            open_join: false,
            members_invite: false,
        }
    }

    fn request(actor: &str, role: Option<Role>, members: u32, action: GroupAction) -> GroupRequest {
        GroupRequest {
            actor: Principal {
                user_id: actor.into(),
                device_id: "d".into(),
            },
            actor_role: role,
            group: Some(Group {
                group_id: "g1".into(),
                name: "team".into(),
                owner: "olga".into(),
                member_count: members,
            }),
            action,
        }
    }

    #[test]
    fn creation_respects_creators_name_and_size() {
        let mut r = rules();
        let create = |members: Vec<&str>, name: &str| GroupRequest {
            group: None,
            ..request(
                "olga",
                None,
                0,
                GroupAction::Create((name.into(), members.into_iter().map(Into::into).collect())),
            )
        };
        assert!(r.decide(&create(vec!["a", "b"], "team")).is_ok());
        assert!(
            r.decide(&create(vec!["a", "b", "c"], "team"))
                .unwrap_err()
                .contains("exceed 3")
        );
        assert!(r.decide(&create(vec![], "")).is_err());
        r.creators = Some(vec!["boss".into()]);
        assert!(
            r.decide(&create(vec![], "team"))
                .unwrap_err()
                .contains("may not create")
        );
    }

    #[test]
    fn joining_inviting_and_leaving() {
        let mut r = rules();
        assert!(
            r.decide(&request("x", None, 1, GroupAction::Join))
                .unwrap_err()
                .contains("invite-only")
        );
        r.open_join = true;
        assert!(r.decide(&request("x", None, 2, GroupAction::Join)).is_ok());
        assert!(
            r.decide(&request("x", None, 3, GroupAction::Join))
                .unwrap_err()
                .contains("exceed")
        );
        let invite =
            |who: Vec<&str>| GroupAction::Invite(who.into_iter().map(Into::into).collect());
        assert!(
            r.decide(&request("m", Some(Role::Member), 1, invite(vec!["y"])))
                .is_err()
        );
        assert!(
            r.decide(&request("a", Some(Role::Admin), 1, invite(vec!["y", "z"])))
                .is_ok()
        );
        assert!(
            r.decide(&request("a", Some(Role::Admin), 2, invite(vec!["y", "z"])))
                .is_err()
        );
        assert!(
            r.decide(&request("olga", Some(Role::Owner), 2, GroupAction::Leave))
                .is_err()
        );
        assert!(
            r.decide(&request("m", Some(Role::Member), 2, GroupAction::Leave))
                .is_ok()
        );
    }

    #[test]
    fn kicks_roles_and_transfers() {
        let r = rules();
        let kick = |who: &str| GroupAction::Kick(vec![who.into()]);
        assert!(
            r.decide(&request("a", Some(Role::Admin), 3, kick("m")))
                .is_ok()
        );
        assert!(
            r.decide(&request("a", Some(Role::Admin), 3, kick("olga")))
                .is_err()
        );
        assert!(
            r.decide(&request("m", Some(Role::Member), 3, kick("a")))
                .is_err()
        );
        let promote = |who: &str, role| {
            GroupAction::SetRole(RoleChange {
                user_id: who.into(),
                role,
            })
        };
        assert!(
            r.decide(&request(
                "olga",
                Some(Role::Owner),
                3,
                promote("m", Role::Admin)
            ))
            .is_ok()
        );
        assert!(
            r.decide(&request(
                "a",
                Some(Role::Admin),
                3,
                promote("m", Role::Admin)
            ))
            .is_err()
        );
        assert!(
            r.decide(&request(
                "olga",
                Some(Role::Owner),
                3,
                promote("m", Role::Owner)
            ))
            .is_err()
        );
        let transfer = GroupAction::TransferOwnership("a".into());
        assert!(
            r.decide(&request("olga", Some(Role::Owner), 3, transfer.clone()))
                .is_ok()
        );
        assert!(
            r.decide(&request("a", Some(Role::Admin), 3, transfer))
                .is_err()
        );
    }
}
