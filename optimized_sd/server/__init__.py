"""The web UI and the AUTOMATIC1111-compatible HTTP API: `optimized-sd serve`.

The server composes the pipeline (nothing in `pipelines/` imports it). `backend` is the only module
that calls the pipeline's API; `jobs` runs one job at a time on the device; `api` and `ui` are two
front ends over the same queue; `app` puts them on one FastAPI application."""
