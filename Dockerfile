# syntax=docker/dockerfile:1
#
# Taskmesh: one image, one binary. Pick the role with the command:
#   docker run taskmesh:local up                  # everything in one process (the default)
#   docker run taskmesh:local serve <service>     # gateway | ingest | scheduler | executor |
#                                                 # git-integration | notification | projector
#   docker run taskmesh:local migrate             # Postgres migrations + JetStream streams, then exit
# The image contains no nats-server or Postgres: point TASKMESH_NATS__URL and
# TASKMESH_POSTGRES__URL at running ones.

############################################################
# Build stage
############################################################
FROM rust:1-bookworm AS builder

WORKDIR /src
# No sqlx query macros need a live database; fail fast if that ever changes.
ENV SQLX_OFFLINE=true

COPY . .

# The registry and target directories are BuildKit cache mounts, so rebuilds reuse
# downloaded crates and compiled dependencies. The target dir is not part of the image
# layer, so the binary is copied out in the same RUN.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin taskmesh \
 && install -D -m 0755 target/release/taskmesh /out/taskmesh

############################################################
# Runtime stage
############################################################
FROM debian:bookworm-slim AS runtime

# The executor runs steps with `sh -c`, so the runtime carries a shell and the usual tools.
# Versions come from the pinned bookworm base; rebuild to pick up security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
        ca-certificates \
        bash \
        coreutils \
        git \
        curl \
        tini \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 10001 taskmesh \
 && useradd --uid 10001 --gid 10001 --home-dir /home/taskmesh --create-home --shell /bin/bash taskmesh

COPY --from=builder /out/taskmesh /usr/local/bin/taskmesh

# In a container the HTTP services must listen on all interfaces (the built-in defaults
# are 127.0.0.1). Workers get TASKMESH_HEALTH__LISTEN from compose / Kubernetes.
ENV TASKMESH_GATEWAY__LISTEN=0.0.0.0:8080 \
    TASKMESH_GIT__LISTEN=0.0.0.0:8081

LABEL org.opencontainers.image.title="taskmesh" \
      org.opencontainers.image.description="Taskmesh: event-sourced multi-tenant workflow platform" \
      org.opencontainers.image.licenses="Apache-2.0"

# Numeric user so Kubernetes can verify runAsNonRoot.
USER 10001:10001
WORKDIR /home/taskmesh

# 8080 gateway, 8081 git-integration, 9090 worker health (/healthz, /readyz).
EXPOSE 8080 8081 9090

ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/taskmesh"]
CMD ["up"]
