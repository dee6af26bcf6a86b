//! The one `bindgen!` site: host-side types and traits generated from `wit/im-plugin@0.2.3`.
//!
//! The `all-hooks` world exports every hook; the runtime checks per plugin which hook interfaces
//! the component really exports (`GuestIndices::new` fails for missing ones), so each hook
//! is optional. Components built against `0.2.0`, `0.2.1` or `0.2.2` link too: each later
//! version only added to them (0.2.1 the `send-guard` hook, 0.2.2 `body-filter`, 0.2.3
//! `body-screen`, `send-screen` and the `current-call` import), and wasmtime resolves their
//! imports and exports to the semver-compatible `@0.2.3` ones.

wasmtime::component::bindgen!({
    path: "../../wit/im-plugin@0.2.3",
    world: "all-hooks",
    // Calls are awaited on the server's tokio tasks: WASI's host functions are async, and
    // their blocking (sync) variants must not run on a runtime thread.
    exports: { default: async },
    // The resources lent to hook calls are host data, never copied wholesale into guests.
    with: {
        "im:plugin/types.call-context": crate::state::CallContextData,
        "im:plugin/types.message": crate::state::MessageSlot,
    },
});

/// The contract's version, written once for the names below.
macro_rules! contract_version {
    () => {
        "0.2.3"
    };
}

/// The contract version this host serves (and every earlier 0.2 version).
pub const CONTRACT: &str = concat!("im:plugin@", contract_version!());

/// The name a component imports or exports the contract's interface `interface` under.
pub fn interface_name(interface: &str) -> String {
    format!("im:plugin/{interface}@{}", contract_version!())
}

pub use exports::im::plugin::{
    authenticator, body_filter, body_screen, group_policy, message_filter, risk_control,
    send_guard, send_screen,
};
pub use im::plugin::{clock, config, current_call, kv, log, types};
