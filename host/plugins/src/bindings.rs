//! The one `bindgen!` site: host-side types and traits generated from `wit/im-plugin@0.2.1`.
//!
//! The `all-hooks` world exports every hook; the runtime checks per plugin which hook interfaces
//! the component really exports (`GuestIndices::new` fails for missing ones), so each hook
//! is optional. Components built against `0.2.0` link too: 0.2.1 only added to it (the
//! `send-guard` hook), and wasmtime resolves `@0.2.0` imports and exports to the
//! semver-compatible `@0.2.1` ones.

wasmtime::component::bindgen!({
    path: "../../wit/im-plugin@0.2.1",
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

/// The contract version this host serves (and every earlier 0.2 version).
pub const CONTRACT: &str = "im:plugin@0.2.1";

pub use exports::im::plugin::{
    authenticator, group_policy, message_filter, risk_control, send_guard,
};
pub use im::plugin::{clock, config, kv, log, types};
