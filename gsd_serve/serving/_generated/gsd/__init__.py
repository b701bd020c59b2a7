# GENERATED package marker (gsd_serve/serving/rpc.py); do not edit
