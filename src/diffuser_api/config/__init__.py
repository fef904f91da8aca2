from diffuser_api.config.settings import Settings

__all__ = ["Settings"]
