"""The plugin machinery: hook specifications, the registrars hooks receive, the plugin manager.

Plugins are modules named by entry points in the group ``imago``; they implement the hooks of
:mod:`imago.plugin.hookspecs`. Everything a plugin may import from the core is exported from
:mod:`imago` itself.
"""
