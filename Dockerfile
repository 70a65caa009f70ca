# Image of the genre-search command line. The compose stack runs it as the `worker`
# service and, with the entrypoint replaced by `mlflow`, as the tracking server.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# soundfile loads the system libsndfile to decode wav, flac, ogg and mp3 clips.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends libsndfile1 \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 --user-group genre

WORKDIR /app
COPY pyproject.toml README.md ./
COPY features ./features
COPY models ./models
COPY search ./search
# NOTE: The default Linux torch wheel bundles the CUDA runtime, so the image is several GB.
RUN pip install . && rm -rf build ./*.egg-info

# A named volume copies the owner of its mount point from the image on first use, so
# these folders must exist and belong to the runtime user.
RUN mkdir -p /data /cache /mlartifacts \
    && chown genre:genre /app /cache /mlartifacts

USER genre
ENTRYPOINT ["genre-search"]
CMD ["--help"]
