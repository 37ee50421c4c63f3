"""One module per method family; each registers its methods with
:func:`marginalize.inference.registry.register`. Methods use the engines and never import
each other."""
