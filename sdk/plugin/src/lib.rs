//! Write plugins for the im server in Rust.
//!
//! Enable one cargo feature per hook your plugin serves (`authenticator`, `message-filter`,
//! `body-filter`, `body-screen`, `group-policy`, `risk-control`, `send-guard`,
//! `send-screen`), implement its trait, and export it with its macro:
//!
//! ```ignore
//! use im_plugin_sdk::filter::{MessageFilter, Verdict};
//! use im_plugin_sdk::{CallContext, Message};
//!
//! struct NoShouting;
//!
//! impl MessageFilter for NoShouting {
//!     fn filter(_ctx: &CallContext, message: &Message) -> Verdict {
//!         let body = message.body();
//!         let text = String::from_utf8_lossy(&body);
//!         if text.len() > 3 && text.chars().all(|c| !c.is_lowercase()) {
//!             return Verdict::Reject("please do not shout".into());
//!         }
//!         Verdict::Allow
//!     }
//! }
//!
//! im_plugin_sdk::export_message_filter!(NoShouting);
//! ```
//!
//! The call context and the message are handles lent by the host for the call: reading a
//! field (`message.body()`, `ctx.transport()`) copies just that field into the plugin. The
//! cheapest hooks, `body-screen` and `send-screen`, lend no handles: what they want to know
//! about the call they read through [`current`].
//!
//! Host services are plain functions: [`log`], [`config`], [`kv`], [`clock`], [`current`]. Build with
//! `cargo build --release --target wasm32-wasip2`; the `.wasm` file is the component to
//! install. See `docs/plugins.md`.

extern crate self as im_plugin_sdk;

#[doc(hidden)]
pub mod __wit_bindgen {
    pub use wit_bindgen::rt;
}

/// Bindings of the imports every plugin may use (generated once, shared by every hook).
#[doc(hidden)]
pub mod base {
    wit_bindgen::generate!({
        path: "../../wit/im-plugin@0.2.3",
        world: "host-api",
        runtime_path: "im_plugin_sdk::__wit_bindgen::rt",
        type_section_suffix: "im-plugin-sdk-host-api",
    });
}

pub use base::im::plugin::types::{CallContext, Message, MessageTarget, Principal};

/// The host's structured log, tagged with this plugin's id.
pub mod log {
    pub use crate::base::im::plugin::log::{Level, log};

    pub fn debug(message: &str) {
        log(Level::Debug, message);
    }
    pub fn info(message: &str) {
        log(Level::Info, message);
    }
    pub fn warn(message: &str) {
        log(Level::Warn, message);
    }
    pub fn error(message: &str) {
        log(Level::Error, message);
    }
}

/// This plugin's configuration (the manifest's `[config]` table), read-only.
pub mod config {
    pub use crate::base::im::plugin::config::{entries, get};

    /// The value of `key`, or `default`.
    pub fn get_or(key: &str, default: &str) -> String {
        get(key).unwrap_or_else(|| default.to_owned())
    }
}

/// This plugin's private key-value store: survives restarts and upgrades, bounded by quota.
pub mod kv {
    pub use crate::base::im::plugin::kv::{Error, compare_and_swap, delete, get, increment, set};
}

/// Time as the host sees it.
pub mod clock {
    pub use crate::base::im::plugin::clock::now_ms;
}

/// The call in progress, read without a handle (contract 0.2.3): what `CallContext` and
/// `Message` tell, for the hooks that lend none (`body-screen`, `send-screen`). The
/// message's fields are `None` in a call that is not about a message.
pub mod current {
    pub use crate::base::im::plugin::current_call::{
        client_msg_id, content_type, conversation_id, node_id, plugin_id, remote_ip, sender,
        target, transport,
    };
}

macro_rules! hook_bindings {
    ($feature:literal, $module:ident, $world:literal, $macro_name:literal, $bindings_path:literal) => {
        #[cfg(feature = $feature)]
        #[doc(hidden)]
        pub mod $module {
            wit_bindgen::generate!({
                path: "../../wit/im-plugin@0.2.3",
                world: $world,
                with: {
                    "im:plugin/types@0.2.3": crate::base::im::plugin::types,
                    "im:plugin/current-call@0.2.3": crate::base::im::plugin::current_call,
                    "im:plugin/log@0.2.3": crate::base::im::plugin::log,
                    "im:plugin/config@0.2.3": crate::base::im::plugin::config,
                    "im:plugin/kv@0.2.3": crate::base::im::plugin::kv,
                    "im:plugin/clock@0.2.3": crate::base::im::plugin::clock,
                },
                pub_export_macro: true,
                export_macro_name: $macro_name,
                default_bindings_module: $bindings_path,
                runtime_path: "im_plugin_sdk::__wit_bindgen::rt",
            });
        }
    };
}

hook_bindings!(
    "authenticator",
    authenticator_bindings,
    "authenticator-plugin",
    "__export_authenticator_plugin",
    "im_plugin_sdk::authenticator_bindings"
);
hook_bindings!(
    "message-filter",
    filter_bindings,
    "filter-plugin",
    "__export_filter_plugin",
    "im_plugin_sdk::filter_bindings"
);
hook_bindings!(
    "body-filter",
    body_filter_bindings,
    "body-filter-plugin",
    "__export_body_filter_plugin",
    "im_plugin_sdk::body_filter_bindings"
);
hook_bindings!(
    "body-screen",
    body_screen_bindings,
    "body-screen-plugin",
    "__export_body_screen_plugin",
    "im_plugin_sdk::body_screen_bindings"
);
hook_bindings!(
    "group-policy",
    group_policy_bindings,
    "group-policy-plugin",
    "__export_group_policy_plugin",
    "im_plugin_sdk::group_policy_bindings"
);
hook_bindings!(
    "risk-control",
    risk_bindings,
    "risk-plugin",
    "__export_risk_plugin",
    "im_plugin_sdk::risk_bindings"
);
hook_bindings!(
    "send-guard",
    send_guard_bindings,
    "send-guard-plugin",
    "__export_send_guard_plugin",
    "im_plugin_sdk::send_guard_bindings"
);
hook_bindings!(
    "send-screen",
    send_screen_bindings,
    "send-screen-plugin",
    "__export_send_screen_plugin",
    "im_plugin_sdk::send_screen_bindings"
);

/// The authenticator hook: credentials in, a user id or a denial out.
#[cfg(feature = "authenticator")]
pub mod auth {
    use crate::CallContext;
    use crate::authenticator_bindings::exports::im::plugin::authenticator::Guest;
    pub use crate::authenticator_bindings::exports::im::plugin::authenticator::{
        AuthResult, Credentials, Identity,
    };

    pub trait Authenticator {
        fn authenticate(ctx: &CallContext, credentials: Credentials) -> AuthResult;
    }

    #[doc(hidden)]
    pub struct Adapter<T>(core::marker::PhantomData<T>);

    impl<T: Authenticator> Guest for Adapter<T> {
        fn authenticate(ctx: &CallContext, credentials: Credentials) -> AuthResult {
            T::authenticate(ctx, credentials)
        }
    }

    /// Exports a type implementing [`Authenticator`] as this component's authenticator.
    #[macro_export]
    macro_rules! export_authenticator {
        ($t:ty) => {
            const _: () = {
                type ImPluginAuthenticator = $crate::auth::Adapter<$t>;
                $crate::authenticator_bindings::__export_authenticator_plugin!(ImPluginAuthenticator with_types_in $crate::authenticator_bindings);
            };
        };
    }
}

/// The message-filter hook: allow, modify, reject or drop a message before it is stored.
#[cfg(feature = "message-filter")]
pub mod filter {
    use crate::filter_bindings::exports::im::plugin::message_filter::Guest;
    pub use crate::filter_bindings::exports::im::plugin::message_filter::{
        FilterVerdict as Verdict, Rewrite,
    };
    use crate::{CallContext, Message};

    pub trait MessageFilter {
        fn filter(ctx: &CallContext, message: &Message) -> Verdict;
    }

    #[doc(hidden)]
    pub struct Adapter<T>(core::marker::PhantomData<T>);

    impl<T: MessageFilter> Guest for Adapter<T> {
        fn filter(ctx: &CallContext, message: &Message) -> Verdict {
            T::filter(ctx, message)
        }
    }

    /// Exports a type implementing [`MessageFilter`] as this component's message filter.
    #[macro_export]
    macro_rules! export_message_filter {
        ($t:ty) => {
            const _: () = {
                type ImPluginMessageFilter = $crate::filter::Adapter<$t>;
                $crate::filter_bindings::__export_filter_plugin!(ImPluginMessageFilter with_types_in $crate::filter_bindings);
            };
        };
    }
}

/// The body-filter hook (contract 0.2.2): a message filter that gets the body with the
/// call instead of reading it through `message.body()`, one trip across the sandbox fewer
/// for a filter that reads every body. Attached to the `message-filter` hook.
#[cfg(feature = "body-filter")]
pub mod body {
    use crate::body_filter_bindings::exports::im::plugin::body_filter::Guest;
    pub use crate::body_filter_bindings::exports::im::plugin::body_filter::{
        FilterVerdict as Verdict, Rewrite,
    };
    use crate::{CallContext, Message};

    pub trait BodyFilter {
        /// `body` is the message's body as it stands (after earlier filters' rewrites).
        fn filter_body(ctx: &CallContext, message: &Message, body: Vec<u8>) -> Verdict;
    }

    #[doc(hidden)]
    pub struct Adapter<T>(core::marker::PhantomData<T>);

    impl<T: BodyFilter> Guest for Adapter<T> {
        fn filter_body(ctx: &CallContext, message: &Message, body: Vec<u8>) -> Verdict {
            T::filter_body(ctx, message, body)
        }
    }

    /// Exports a type implementing [`BodyFilter`] as this component's body filter.
    #[macro_export]
    macro_rules! export_body_filter {
        ($t:ty) => {
            const _: () = {
                type ImPluginBodyFilter = $crate::body::Adapter<$t>;
                $crate::body_filter_bindings::__export_body_filter_plugin!(ImPluginBodyFilter with_types_in $crate::body_filter_bindings);
            };
        };
    }
}

/// The body-screen hook (contract 0.2.3): a message filter given only the body, with no
/// handles lent (the cheapest call a filter can be); anything else about the message is
/// read through [`crate::current`]. Attached to the `message-filter` hook.
#[cfg(feature = "body-screen")]
pub mod screen {
    use crate::body_screen_bindings::exports::im::plugin::body_screen::Guest;
    pub use crate::body_screen_bindings::exports::im::plugin::body_screen::{
        FilterVerdict as Verdict, Rewrite,
    };

    pub trait BodyScreen {
        /// `body` is the message's body as it stands (after earlier filters' rewrites).
        fn screen(body: Vec<u8>) -> Verdict;
    }

    #[doc(hidden)]
    pub struct Adapter<T>(core::marker::PhantomData<T>);

    impl<T: BodyScreen> Guest for Adapter<T> {
        fn screen(body: Vec<u8>) -> Verdict {
            T::screen(body)
        }
    }

    /// Exports a type implementing [`BodyScreen`] as this component's body screen.
    #[macro_export]
    macro_rules! export_body_screen {
        ($t:ty) => {
            const _: () = {
                type ImPluginBodyScreen = $crate::screen::Adapter<$t>;
                $crate::body_screen_bindings::__export_body_screen_plugin!(ImPluginBodyScreen with_types_in $crate::body_screen_bindings);
            };
        };
    }
}

/// The group-policy hook: allow or deny group creation and membership changes.
#[cfg(feature = "group-policy")]
pub mod groups {
    use crate::CallContext;
    use crate::group_policy_bindings::exports::im::plugin::group_policy::Guest;
    pub use crate::group_policy_bindings::exports::im::plugin::group_policy::{
        Group, GroupAction, GroupDecision, GroupRequest, Role, RoleChange,
    };

    pub trait GroupPolicy {
        fn decide(ctx: &CallContext, request: GroupRequest) -> GroupDecision;
    }

    #[doc(hidden)]
    pub struct Adapter<T>(core::marker::PhantomData<T>);

    impl<T: GroupPolicy> Guest for Adapter<T> {
        fn decide(ctx: &CallContext, request: GroupRequest) -> GroupDecision {
            T::decide(ctx, request)
        }
    }

    /// Exports a type implementing [`GroupPolicy`] as this component's group policy.
    #[macro_export]
    macro_rules! export_group_policy {
        ($t:ty) => {
            const _: () = {
                type ImPluginGroupPolicy = $crate::groups::Adapter<$t>;
                $crate::group_policy_bindings::__export_group_policy_plugin!(ImPluginGroupPolicy with_types_in $crate::group_policy_bindings);
            };
        };
    }
}

/// The risk-control hook: allow, throttle or block logins and sends.
#[cfg(feature = "risk-control")]
pub mod risk {
    use crate::CallContext;
    use crate::risk_bindings::exports::im::plugin::risk_control::Guest;
    pub use crate::risk_bindings::exports::im::plugin::risk_control::{
        LoginAttempt, RiskEvent, RiskVerdict, Throttle,
    };

    pub trait RiskControl {
        fn assess(ctx: &CallContext, event: RiskEvent<'_>) -> RiskVerdict;
    }

    #[doc(hidden)]
    pub struct Adapter<T>(core::marker::PhantomData<T>);

    impl<T: RiskControl> Guest for Adapter<T> {
        fn assess(ctx: &CallContext, event: RiskEvent<'_>) -> RiskVerdict {
            T::assess(ctx, event)
        }
    }

    /// Exports a type implementing [`RiskControl`] as this component's risk control.
    #[macro_export]
    macro_rules! export_risk_control {
        ($t:ty) => {
            const _: () = {
                type ImPluginRiskControl = $crate::risk::Adapter<$t>;
                $crate::risk_bindings::__export_risk_plugin!(ImPluginRiskControl with_types_in $crate::risk_bindings);
            };
        };
    }
}

/// The send-guard hook (contract 0.2.1): risk control's sends, with the sender's state
/// handed in by the host and the new state handed back, so a check needs no host calls.
/// A plugin exporting it with `risk-control` gets only logins in `RiskControl::assess`.
#[cfg(feature = "send-guard")]
pub mod guard {
    use crate::CallContext;
    use crate::send_guard_bindings::exports::im::plugin::send_guard::Guest;
    pub use crate::send_guard_bindings::exports::im::plugin::send_guard::{
        Assessment, SendCheck, SendVerdict, StateChange, StateWrite, Throttle,
    };

    pub trait SendGuard {
        fn check_send(ctx: &CallContext, check: SendCheck<'_>) -> Assessment;
    }

    #[doc(hidden)]
    pub struct Adapter<T>(core::marker::PhantomData<T>);

    impl<T: SendGuard> Guest for Adapter<T> {
        fn check_send(ctx: &CallContext, check: SendCheck<'_>) -> Assessment {
            T::check_send(ctx, check)
        }
    }

    /// Exports a type implementing [`SendGuard`] as this component's send guard.
    #[macro_export]
    macro_rules! export_send_guard {
        ($t:ty) => {
            const _: () = {
                type ImPluginSendGuard = $crate::guard::Adapter<$t>;
                $crate::send_guard_bindings::__export_send_guard_plugin!(ImPluginSendGuard with_types_in $crate::send_guard_bindings);
            };
        };
    }
}

/// The send-screen hook (contract 0.2.3): `send-guard`'s check with no handles lent; the
/// sender and the rest of the message are read through [`crate::current`] when needed.
/// A plugin exporting it with `risk-control` gets only logins in `RiskControl::assess`.
#[cfg(feature = "send-screen")]
pub mod send_screen {
    use crate::send_screen_bindings::exports::im::plugin::send_screen::Guest;
    pub use crate::send_screen_bindings::exports::im::plugin::send_screen::{
        Assessment, SendFacts, SendVerdict, StateChange, StateWrite, Throttle,
    };

    pub trait SendScreen {
        fn screen_send(facts: SendFacts) -> Assessment;
    }

    #[doc(hidden)]
    pub struct Adapter<T>(core::marker::PhantomData<T>);

    impl<T: SendScreen> Guest for Adapter<T> {
        fn screen_send(facts: SendFacts) -> Assessment {
            T::screen_send(facts)
        }
    }

    /// Exports a type implementing [`SendScreen`] as this component's send screen.
    #[macro_export]
    macro_rules! export_send_screen {
        ($t:ty) => {
            const _: () = {
                type ImPluginSendScreen = $crate::send_screen::Adapter<$t>;
                $crate::send_screen_bindings::__export_send_screen_plugin!(ImPluginSendScreen with_types_in $crate::send_screen_bindings);
            };
        };
    }
}
