"""Tenant quotas shared by guard replicas (Redis)."""
