"""Graph passes, one per file, each a plain function GraphModule -> GraphModule."""
