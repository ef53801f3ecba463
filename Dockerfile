# Multi-stage build: compile in the Rust image, ship only the binary on a slim
# Debian base, run as an unprivileged user. The SQL is embedded in the binary,
# so `docker run IMAGE install --database-url ...` works as well as `serve`.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY sql sql
COPY triggers triggers
RUN cargo build --release --locked --bin pgrelay

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin pgrelay
COPY --from=build /src/target/release/pgrelay /usr/local/bin/pgrelay
USER 10001
ENV PGRELAY_LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["pgrelay"]
CMD ["serve"]
