"""State shared between replicas in cluster mode (``cluster.redis_url``): who leads
(:mod:`.lease`) and what every replica reports (:mod:`.cluster`). Below both paths: the
controller and the service use it; it imports neither. Nothing here is imported (nor is
redis) when no Redis URL is configured."""
