# sluice: build with cmake available, run slim as a non-root user.
# Config, master keys and CA certificates are mounted at run time, never baked in:
#   /etc/sluice/sluice.toml   the config (its relative paths resolve against /etc/sluice)
#   /etc/sluice/certs/        extra CA certificates (upstream.extra_ca_file)
#   SLUICE_MASTER_KEYS        master keys (credentials.key_env), or a mounted key file
#   /var/lib/sluice           the embedded store, when used (a volume)

# The toolchain that trained benches/pgo/sluice.profdata.xz: another rustc changes every symbol
# hash, and the profile would then silently match nothing (benches/pgo.py).
FROM rust:1.95.0-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake=3.25.* \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
# Profile-guided: trained on the load bench's traffic (benches/pgo.py, BENCHMARKS.md).
RUN xz -dc benches/pgo/sluice.profdata.xz > /tmp/sluice.profdata \
 && RUSTFLAGS="-Cprofile-use=/tmp/sluice.profdata" \
    cargo build --profile production --locked --bin sluice

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates=20230311* curl=7.88.* \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/sluice --create-home --shell /usr/sbin/nologin sluice
COPY --from=build /src/target/production/sluice /usr/local/bin/sluice
USER 10001
WORKDIR /var/lib/sluice
VOLUME ["/var/lib/sluice"]
ENV SLUICE_LOG_FORMAT=json
# 8080: the proxy (HTTP_PROXY). 9090: the admin API, /metrics, /healthz, /readyz.
EXPOSE 8080 9090
# The admin listener must be configured (its address reachable on 127.0.0.1 in the container).
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
  CMD ["curl", "-fsS", "http://127.0.0.1:9090/healthz"]
# SIGTERM drains (listener.shutdown_grace_ms), then exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["sluice"]
CMD ["run", "--config", "/etc/sluice/sluice.toml"]
