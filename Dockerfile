# syntax=docker/dockerfile:1
# Two images, one per accelerator; both install through install.sh, the script CI runs:
#   docker build --target cuda   -t birkhoff:cuda .
#   docker build --target ascend -t birkhoff:ascend .
# Unbuilt on the project's machines (no Docker daemon there); tests/test_dockerfile.py parses
# this file with Docker's own parser and checks the targets, pins and install path.

# CUDA: the runtime base is enough, torch's CUDA wheel brings its CUDA libraries.
FROM nvidia/cuda:12.9.1-runtime-ubuntu24.04 AS cuda
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv git \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 birkhoff \
    && python3 -m venv /opt/venv && chown birkhoff:birkhoff /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
WORKDIR /opt/birkhoff
COPY --chown=birkhoff:birkhoff . .
USER birkhoff
RUN bash install.sh cuda
HEALTHCHECK --interval=5m --timeout=2m CMD ["birkhoff", "doctor", "--ranks", "1", "--run-dir", "/tmp"]
ENTRYPOINT ["birkhoff"]
CMD ["train"]

# Ascend: CANN 8.2 for the 910B with Python 3.11 (the toolkit's environment is sourced for
# every command); torch's CPU wheel, then torch_npu of the same version (birkhoff[npu]).
FROM ascendai/cann:8.2.rc1-910b-ubuntu22.04-py3.11 AS ascend
RUN useradd --create-home --uid 1000 birkhoff \
    && python3 -m venv /opt/venv && chown birkhoff:birkhoff /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
WORKDIR /opt/birkhoff
COPY --chown=birkhoff:birkhoff . .
USER birkhoff
RUN bash install.sh npu
HEALTHCHECK --interval=5m --timeout=2m CMD ["/opt/birkhoff/docker/ascend-env", "birkhoff", "doctor", "--ranks", "1", "--run-dir", "/tmp"]
ENTRYPOINT ["/opt/birkhoff/docker/ascend-env", "birkhoff"]
CMD ["train"]
