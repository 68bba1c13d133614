# One image, three roles (agent, sidecar, controller): `gpu-supervisor <role>`.
#
#   docker build -t gpu-supervisor:0.1.0 .                                  # agent, controller, sidecar
#   docker build --build-arg EXTRAS=collective -t gpu-supervisor-sidecar:0.1.0 .
#
# The second adds torch for the sidecar's all-reduce checks (gpu-supervisor[collective]);
# it is several GB (PyPI's torch is the CUDA build), which is why it is a separate image.
ARG EXTRAS=""
FROM python:3.11-slim-bookworm AS build
ARG EXTRAS
WORKDIR /src
COPY pyproject.toml README.md ./
COPY supervisor ./supervisor
COPY probes ./probes
COPY policies ./policies
COPY bench ./bench
RUN pip install --no-cache-dir --prefix=/install "/src${EXTRAS:+[$EXTRAS]}"

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="gpu-supervisor" \
      org.opencontainers.image.description="GPU health and fault-tolerance supervisor for multi-node model serving"
COPY --from=build /install /usr/local
# Non-root with a fixed UID so manifests can pin runAsUser; nothing writes to the image.
RUN groupadd --gid 65532 supervisor \
    && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin supervisor
USER 65532:65532
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
EXPOSE 8085 8086 8443 8088/udp 8089
ENTRYPOINT ["gpu-supervisor"]
CMD ["agent"]
