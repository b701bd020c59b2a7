"""Ray Serve deployments of gsd-serve: thin adapters over gsd_serve.serving (workers, router, frontends).

This folder is the repository's top-level services/ (draft/, target/, router/), installed as the package
gsd_serve.services (pyproject.toml maps it): gsd_serve.services.app:build_app is the import path of the
Serve application (deploy/*.yaml). Part of the serving layer: never imports gsd_serve.cli.
"""
