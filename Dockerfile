# The one image the manifests name (`lockstep:latest`): the operator and its control plane
# (`python -m orchestrator.operator`), the node agent (`lpuctl agent`) and the Ray head and
# workers of manifests/ray/raycluster.yaml. Build from the repository root:
#
#     docker build -t lockstep:latest .
#
# Not built by the tests (no container daemon on the development machines); the manifests'
# schema checks and the stand-in API server do not run images.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/lockstep
COPY pyproject.toml README.md ./
COPY placement ./placement
COPY shardformat ./shardformat
COPY security ./security
COPY protos ./protos
COPY agents ./agents
COPY orchestrator ./orchestrator
COPY manifests/examples ./examples
RUN pip install . && rm -rf /opt/lockstep/build

# The manifests run every container as this non-root user (runAsUser 65532).
USER 65532:65532
WORKDIR /var/lib/lockstep
ENTRYPOINT []
CMD ["lpuctl", "--help"]
