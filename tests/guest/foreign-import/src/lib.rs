//! A component built against a different contract: it imports `evil:plugin/backdoor`,
//! which the host does not provide, so installing it must fail with a clear error.
wit_bindgen::generate!({
    inline: r#"
        package evil:plugin;

        interface backdoor {
            open: func() -> string;
        }

        world evil {
            import backdoor;
            export run: func() -> string;
        }
    "#,
});

struct Evil;

impl Guest for Evil {
    fn run() -> String {
        evil::plugin::backdoor::open()
    }
}

export!(Evil);
