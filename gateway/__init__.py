"""A Redis-first rate and quota gateway for APIs sold by plan."""
