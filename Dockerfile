# One image for every role: the `shardgrad` command picks it
# (`coordinator`, `worker`, or a client command such as `submit`).
#
#   docker build -t shardgrad .                      # with a package registry
#   docker-compose up -d --build --scale worker=4    # see docs/docker.md
#
# Offline build (no package index reachable from the build): put wheels for every
# dependency in .wheelhouse/ first and pass
#   --build-arg PIP_INSTALL_ARGS="--no-index --find-links /src/.wheelhouse"
# BASE_IMAGE may be any image with Python 3.11 and its venv module.
ARG BASE_IMAGE=python:3.11-slim

# ---- build stage: a venv with the project and its `data` extra -------------------------
FROM ${BASE_IMAGE} AS build
ARG PIP_INSTALL_ARGS=""
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
COPY . /src
RUN /opt/venv/bin/pip install ${PIP_INSTALL_ARGS} "/src[data]" \
 && /opt/venv/bin/python -c "import shardgrad, numpy, zmq, msgpack, sklearn"

# ---- runtime stage: the venv only, no sources, no wheelhouse ---------------------------
FROM ${BASE_IMAGE}
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SHARDGRAD_STATE_DIR=/state \
    SHARDGRAD_DATA_ROOT=/data
RUN useradd --system --create-home --home-dir /home/shardgrad --uid 10001 shardgrad \
 && mkdir -p /state /data \
 && chown shardgrad:shardgrad /state   # an empty named volume mounted here inherits this owner
COPY --from=build /opt/venv /opt/venv
USER shardgrad
WORKDIR /home/shardgrad
# 5555: workers connect here; 5556: clients (submit, status, watch, fetch, cancel).
EXPOSE 5555 5556
ENTRYPOINT ["shardgrad"]
CMD ["--help"]
