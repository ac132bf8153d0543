//! Compiles `proto/*.proto` (at the repository's top level) with a vendored `protoc`, so a
//! build never depends on whichever protoc (if any) happens to be installed on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    let protos = ["../proto/tessera.proto", "../proto/etcd.proto"];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure().compile_protos(&protos[..1], &["../proto"])?;
    // etcd's KV API, client side only: `tessera bench --target etcd`.
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&protos[1..], &["../proto"])?;
    Ok(())
}
