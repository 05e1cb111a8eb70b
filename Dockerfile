# One image for every splitwise service; the steps are the README's setup (make install).
FROM python:3.11-slim

RUN apt-get update && apt-get install -y --no-install-recommends make libibverbs1 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY . .
# On a CUDA host, build with --build-arg TORCH="torch==2.13.0" from the CUDA index of your choice.
ARG TORCH=torch==2.13.0
RUN make install TORCH="$TORCH"
ENV PATH=/app/.venv/bin:$PATH \
    SPLITWISE_CACHE_DIR=/models
# Convert the GGUF once at build time so containers start in seconds.
RUN splitwise prepare
CMD ["splitwise", "--help"]
