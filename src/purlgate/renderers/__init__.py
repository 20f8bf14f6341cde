"""Render backends behind ``purlgate.core.render.Renderer``."""
