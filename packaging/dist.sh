#!/usr/bin/env bash
# Builds the release archives, the way node_exporter ships them:
#
#   target/dist/agent-<version>-linux-x86_64.tar.gz    static binary (musl)
#   target/dist/agent-<version>-linux-aarch64.tar.gz   glibc binary (see README)
#   target/dist/SHA256SUMS
#
# Each archive unpacks to agent-<version>-linux-<arch>/ with the binary, the
# manual page, bash/zsh/fish completions, agent.yaml, the systemd unit and
# LICENSE. The binaries are built with the toolchain Cargo.toml's
# `rust-version` names, the one CI enforces and the Dockerfile builds with,
# and carry symbols but no debug info.
#
# Runs on an x86_64 Linux host with rustup and Debian's musl-tools,
# gcc-aarch64-linux-gnu and libc6-dev-arm64-cross; rustup fetches the
# toolchain and targets when they are missing. Archive metadata is fixed
# (file times are the last commit's, owners are root), so the same binaries
# give the same archives.
#
# Usage: packaging/dist.sh [OUT_DIR]   (default target/dist)
set -euo pipefail
cd "$(dirname "$0")/.."

out=${1:-target/dist}
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
toolchain=$(sed -n 's/^rust-version = "\(.*\)"$/\1/p' Cargo.toml)
musl=x86_64-unknown-linux-musl
arm=aarch64-unknown-linux-gnu

die() { echo "dist.sh: $*" >&2; exit 1; }
[ "$(uname -m)" = x86_64 ] || die "runs on x86_64 hosts only (it runs the x86_64 build to write the manual page)"
for tool in musl-gcc aarch64-linux-gnu-gcc aarch64-linux-gnu-strip readelf sha256sum; do
  command -v "$tool" >/dev/null || die "$tool not found (Debian: apt-get install musl-tools gcc-aarch64-linux-gnu libc6-dev-arm64-cross binutils)"
done
rustup toolchain install "$toolchain" --profile minimal --target "$musl" --target "$arm" >/dev/null

echo "==> building agent $version with Rust $toolchain for $musl and $arm"
cargo "+$toolchain" build --release --locked --bin agent --target "$musl"
cargo "+$toolchain" build --release --locked --bin agent --target "$arm"

musl_bin=target/$musl/release/agent
arm_bin=target/$arm/release/agent
# Static means no program interpreter and no shared library to load.
if readelf -lW "$musl_bin" | grep -q INTERP || readelf -dW "$musl_bin" | grep -q NEEDED; then
  die "$musl_bin is not statically linked"
fi
readelf -hW "$arm_bin" | grep -q 'Machine:.*AArch64' || die "$arm_bin is not an aarch64 binary"
# The newest glibc symbol version the aarch64 binary needs is its floor;
# README "Platforms" promises 2.34 (Debian 12, Ubuntu 22.04, RHEL 9).
glibc=$(readelf -VW "$arm_bin" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n 1)
[ "$(printf '%s\n' "$glibc" GLIBC_2.34 | sort -V | tail -n 1)" = GLIBC_2.34 ] \
  || die "$arm_bin needs $glibc, newer than the 2.34 README promises"
echo "$musl_bin: static; $arm_bin: needs $glibc or newer"

epoch=$(git log -1 --format=%ct 2>/dev/null || date +%s)
rm -rf "$out"
mkdir -p "$out"
package() { # arch binary strip
  local name="agent-$version-linux-$1"
  local dir="$out/$name"
  mkdir -p "$dir/completions"
  "$3" --strip-debug -o "$dir/agent" "$2"
  "$musl_bin" man >"$dir/agent.1"
  "$musl_bin" completions bash >"$dir/completions/agent.bash"
  "$musl_bin" completions zsh >"$dir/completions/_agent"
  "$musl_bin" completions fish >"$dir/completions/agent.fish"
  cp agent.yaml packaging/agent.service LICENSE "$dir/"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" \
    -C "$out" -cf - "$name" | gzip -n -9 >"$out/$name.tar.gz"
  rm -rf "$dir"
}
package x86_64 "$musl_bin" strip
package aarch64 "$arm_bin" aarch64-linux-gnu-strip
(cd "$out" && sha256sum -- *.tar.gz >SHA256SUMS)
echo "==> $out:"
(cd "$out" && ls -l && cat SHA256SUMS)
