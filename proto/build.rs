//! Compiles `im/v1/im.proto` with protox (pure Rust, no protoc) and generates prost types.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=im");
    let descriptors = protox::compile(["im/v1/im.proto"], ["."])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
