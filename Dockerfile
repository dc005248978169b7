# The ckpt-uploader sidecar: slim, non-root, no torch; the console script is the entrypoint.
#
#   docker build -t ckpt-uploader .          # or: podman build / buildah bud
#   docker run --rm -v "$PWD/runs/exp1:/run-dir" -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY \
#     ckpt-uploader watch /run-dir --to s3://my-checkpoints/exp1 --metrics-port 9108 \
#     --metrics-addr 0.0.0.0
#
# Only the runtime dependencies are installed (pyproject's [project] dependencies, pinned
# by constraints.txt); torch is an extra the sidecar never needs.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
COPY uploader/ uploader/
COPY ckpt/ ckpt/
RUN python -m venv /opt/ckpt-uploader \
    && /opt/ckpt-uploader/bin/pip install -c constraints.txt . \
    && /opt/ckpt-uploader/bin/ckpt-uploader --version

FROM python:3.11-slim
COPY --from=build /opt/ckpt-uploader /opt/ckpt-uploader
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin ckpt
ENV PATH=/opt/ckpt-uploader/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
# --metrics-port 9108 (give --metrics-addr the pod IP or 0.0.0.0 to reach it from outside)
EXPOSE 9108
ENTRYPOINT ["ckpt-uploader"]
CMD ["--help"]
