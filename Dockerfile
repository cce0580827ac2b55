# The example chat servers in a small image: `chat-server` (the web page at / and the WebSockets)
# and `chat-server-tungstenite` (WebSockets only). docs/deploy.md tells how to run it;
# scripts/check-deploy.sh checks this file without a container engine.
#
#   docker build -t chat .
#   docker run --rm -p 8000:8000 chat                            # chat-server, dev sign-in, SQLite
#   docker run --rm -p 8000:8000 chat chat-server-tungstenite --layer redis ...
#
# Needs BuildKit (the default builder since Docker 23.0, and the one `docker compose` uses) for
# the cache mounts below.

# Rust 1.89 is the workspace's rust-version; scripts/check-deploy.sh fails when a locked
# dependency the image builds needs a newer compiler than this image has.
FROM rust:1.89-slim-bookworm AS builder
WORKDIR /src
COPY . .
# The cache mounts keep the crates.io downloads and the compiled dependencies from one build to
# the next, so a change to the sources recompiles only the workspace's own crates. The target
# directory is one of them and is not part of the image, so the binaries are copied out of it in
# the same step. `--locked`: exactly the versions in Cargo.lock.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --example chat-server --example chat-server-tungstenite \
    && mkdir -p /out \
    && cp target/release/examples/chat-server target/release/examples/chat-server-tungstenite /out/

# Same Debian release as the builder, so the binaries find the glibc they were linked against.
# Nothing is installed: the binaries need only glibc and libgcc_s (SQLite is compiled in) and
# speak no TLS (Cargo.lock has no openssl-sys, native-tls or rustls, which check-deploy.sh keeps
# true; Redis and PostgreSQL are reached in plain TCP), so no libssl or ca-certificates either.
FROM debian:bookworm-slim AS runtime
# A fixed uid/gid that is not root, so volume permissions and `runAsNonRoot`-style policies can
# name it. /app is the working directory, writable by it for the default SQLite store (chat.db).
RUN groupadd --gid 10001 chat \
    && useradd --uid 10001 --gid chat --home-dir /app --no-create-home \
        --shell /usr/sbin/nologin chat \
    && install -d -o chat -g chat -m 0750 /app
COPY --from=builder /out/chat-server /out/chat-server-tungstenite /usr/local/bin/
COPY --chmod=0755 deploy/docker/healthcheck /usr/local/bin/chat-healthcheck
WORKDIR /app
USER 10001:10001
# Every flag can be given as its environment variable (README.md's table); inside a container
# the server must listen on all interfaces, not on 127.0.0.1.
ENV CHAT_ADDR=0.0.0.0:8000
EXPOSE 8000
# chat-healthcheck asks the server itself for GET /healthz (200 while the process serves) over
# bash's /dev/tcp and reads the status line: a real HTTP check without adding curl or wget
# (and their libraries) to the image. docker-compose.yml asks for /readyz instead.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["chat-healthcheck", "/healthz"]
# SIGTERM (Docker's default): the server closes every socket with 1001 and exits within 10 s.
STOPSIGNAL SIGTERM
CMD ["chat-server"]
