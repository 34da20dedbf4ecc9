"""Who is in the global world: static (launcher environment) or a coordinator's views."""
