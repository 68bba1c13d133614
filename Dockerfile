# One image, three roles (agent, sidecar, controller): `gpu-supervisor <role>`.
#
#   docker build -t gpu-supervisor:0.1.0 .                                  # agent, controller, sidecar
#   docker build --build-arg EXTRAS=collective -t gpu-supervisor-sidecar:0.1.0 .
#
# The second adds torch for the sidecar's all-reduce checks (gpu-supervisor[collective]);
# it is several GB (PyPI's torch is the CUDA build), which is why it is a separate image.
#
# Every third-party package comes from a hash-pinned lock in deploy/image/ (regenerate with
# `bash deploy/image/lock.sh`): requirements.lock for the default image,
# requirements-<EXTRAS>.lock for a variant, requirements-build.lock for the build backend.
#
# Both stages use the same base, pinned by digest (the venv built in the first stage links to
# its interpreter, so the final stage must have the same one). To move to a newer
# python:3.11-slim-bookworm, take the index digest printed by
#   docker buildx imagetools inspect python:3.11-slim-bookworm
# and replace it in both FROM lines.
ARG EXTRAS=""

FROM python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b AS build
ARG EXTRAS
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY deploy/image/*.lock ./deploy/image/
# The build backend (setuptools, wheel) goes into this stage's own Python only: it builds our
# wheel below and never reaches the final image.
RUN pip install --no-cache-dir --require-hashes --no-deps -r deploy/image/requirements-build.lock
# Dependencies go into a venv that has no pip of its own (`pip --python` installs into it
# from outside), before the source is copied so that this layer survives code changes.
RUN python -m venv --without-pip /opt/gpu-supervisor \
    && pip --python /opt/gpu-supervisor/bin/python install --no-cache-dir \
        --require-hashes --no-deps -r "deploy/image/requirements${EXTRAS:+-$EXTRAS}.lock"
COPY pyproject.toml README.md ./
COPY supervisor ./supervisor
COPY probes ./probes
COPY policies ./policies
# Our own package is built here from the copied source: it is not published on PyPI, so there
# is no artifact to hash and it is the one install without --require-hashes. --no-deps: all
# it needs came from the lock above (pip check proves the lock was complete);
# --no-build-isolation: the build uses the hash-locked backend instead of fetching one.
RUN pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /wheels . \
    && pip --python /opt/gpu-supervisor/bin/python install --no-cache-dir --no-deps /wheels/*.whl \
    && pip --python /opt/gpu-supervisor/bin/python check

FROM python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b
LABEL org.opencontainers.image.title="gpu-supervisor" \
      org.opencontainers.image.description="GPU health and fault-tolerance supervisor for multi-node model serving" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11-slim-bookworm"
# Non-root with a fixed UID so manifests can pin runAsUser; nothing writes to the image
# (the venv stays root-owned and read-only to the daemon).
RUN groupadd --gid 65532 supervisor \
    && useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin supervisor
COPY --from=build /opt/gpu-supervisor /opt/gpu-supervisor
ENV PATH="/opt/gpu-supervisor/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 65532:65532
EXPOSE 8085 8086 8443 8088/udp 8089
ENTRYPOINT ["gpu-supervisor"]
CMD ["agent"]
