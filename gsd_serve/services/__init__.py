"""Ray Serve deployments of gsd-serve: thin adapters over gsd_serve.serving (workers, router, frontends).

    app.py          build_app: Router.bind(args, Draft.bind(args), Target.bind(args)), the import path
                    gsd_serve.services.app:build_app of every Serve config (deploy/*.yaml)
    draft.py        the Draft deployment (a DraftWorker served over gRPC)
    target.py       the Target deployment (a TargetWorker served over gRPC, tensor-parallel ranks as actors)
    router.py       the Router deployment (the OpenAI-compatible HTTP API and gsd.v1.Router)
    common.py       what they share: app args, model loading, the replica registry and heartbeats
    autoscaling.py  ReplicaLoadPolicy: Serve autoscaling on the load the replicas measure

Part of the serving layer: may import gsd_serve.core, gsd_serve.models and gsd_serve.serving, Ray, gRPC and
Redis; never imports gsd_serve.training, gsd_serve.tools or gsd_serve.cli.
"""
