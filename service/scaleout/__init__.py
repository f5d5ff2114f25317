"""Scale-out on Ray Serve: a thin FastAPI ingress (today's routers, schemas, auth, limits and error bodies) in front of
N model replicas, each running today's engine, all sharing one prefix store on disk.

Modules:
  - `protocol`: what crosses Ray between ingress and replicas (plain data: status + body, never pickled exceptions);
  - `remote_engine`: the ingress-side `Engine` that calls the model deployment's handle;
  - `replica`: the model replica's core (engine + shared store + per-replica stats), free of Ray;
  - `ingress`: the ingress's `ServiceState` (tokenizer and config only, no weights) and deployment-wide health/metrics;
  - `router`: the model deployment's Serve request router (task-version affinity as a hint, load as the rule);
  - `app`: the Ray Serve deployments and the application builder (`serve run service.scaleout.app:app`);
  - `launch`: `prefix-serve serve --replicas N`.
Only `router`, `app` and `launch` import Ray.
"""
