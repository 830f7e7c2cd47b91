"""Decisions made before anything loads: the hardware plan (`plan_for`), the memory plan, time and
cost. Pure functions of `Machine`, the request and the model's config.json.
"""
