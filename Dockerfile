# Slim, non-root image of the service; the healthcheck asks /healthz. Default store: SQLite in the volume.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 optim && install -d -o optim /home/optim/data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER optim
WORKDIR /home/optim
# Compile the numba kernels into the image, so a container's first request never waits for them.
ENV NUMBA_CACHE_DIR=/home/optim/.cache/numba
RUN python -c "from optim_service.optim.config import warm_kernels; warm_kernels()"
ENV OPTIM_HOST=0.0.0.0 OPTIM_PORT=8000 OPTIM_STORE=sqlite:///data/optim.db
VOLUME /home/optim/data
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('OPTIM_PORT', '8000'), timeout=2).status != 200)"]
ENTRYPOINT ["optim-service", "serve"]
