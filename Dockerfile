# Aegis: build on the Rust image, run on distroless as uid 65532.
# Checked (as text only: it is not built in CI) by scripts/validate_deploy.py.

FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
# build.rs embeds policies/ as the default bundle.
RUN cargo build --release --locked --bin aegis

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/aegis /usr/local/bin/aegis
# The default bundle as files too (the binary also embeds it), for `aegis policy test`.
COPY --from=build /src/policies /etc/aegis/policies
USER 65532:65532
WORKDIR /home/nonroot
EXPOSE 9191 9192 9193 9194
# mimalloc (Aegis's allocator) takes no transparent huge pages, on any host THP setting.
ENV MIMALLOC_ALLOW_THP=0
ENTRYPOINT ["/usr/local/bin/aegis"]
CMD ["serve"]
