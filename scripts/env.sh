# Sourced by the other scripts: installs what a fresh Debian machine lacks and points cargo at
# a target directory outside the checkout, so repeated runs reuse the RocksDB build.

set -euo pipefail

need_pkgs=()
# librocksdb-sys runs bindgen (needs libclang) and compiles RocksDB's C++ sources.
[ -e /usr/lib/llvm-14/lib/libclang.so ] || ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || need_pkgs+=(libclang-dev)
command -v clang >/dev/null 2>&1 || need_pkgs+=(clang)
command -v g++ >/dev/null 2>&1 || need_pkgs+=(g++)
command -v make >/dev/null 2>&1 || need_pkgs+=(make)
# scripts/module-deps.py (the import-cycle check in scripts/test.sh).
command -v python3 >/dev/null 2>&1 || need_pkgs+=(python3)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "installing system packages: ${need_pkgs[*]}" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "error: cargo not found; install a Rust toolchain (https://rustup.rs) first" >&2
  exit 1
fi

if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  if mkdir -p /var/cache/tessera-target 2>/dev/null && [ -w /var/cache/tessera-target ]; then
    export CARGO_TARGET_DIR=/var/cache/tessera-target
  else
    export CARGO_TARGET_DIR="$PWD/target"
  fi
fi

# Build for an explicit target triple. Without one, cargo shares build-dependency units (the
# bindgen and cc that RocksDB's build script uses) with normal dependencies in `build` mode but
# not in `check` mode, and dev-dependencies change their features: clippy, `cargo build --bin`
# and the test build would each compile RocksDB's C++ again. With --target the host units are
# separate and identical in every mode, so one RocksDB build serves all of them.
if [ -z "${CARGO_BUILD_TARGET:-}" ]; then
  CARGO_BUILD_TARGET="$(rustc -vV | sed -n 's/^host: //p')"
  export CARGO_BUILD_TARGET
fi
# Where the binaries land.
export TESSERA_BIN_DIR="$CARGO_TARGET_DIR/$CARGO_BUILD_TARGET/debug"

