# kairos with the CUDA backend compiled in (cudarc loads the driver at run time).
FROM rust:1.90-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --features cuda

FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/kairos /usr/local/bin/kairos
COPY configs /app/configs
WORKDIR /app
ENTRYPOINT []
