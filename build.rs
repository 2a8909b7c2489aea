//! Compiles `proto/kvshelf/v1/*.proto` with protox (a pure-Rust protobuf compiler), so a clean
//! machine builds the gRPC service without a system `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    #[cfg(feature = "grpc")]
    {
        let fds = protox::compile(["kvshelf/v1/shelf.proto"], ["proto"])?;
        tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    }
    Ok(())
}
