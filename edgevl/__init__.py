"""edgevl: an edge vision-language appliance answering questions about images on the CPU."""

__version__ = "0.1.0"
