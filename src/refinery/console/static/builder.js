/* The segment builder: a visual editor of segment rules kept in step with the rule text.
 *
 * The tree (refinery/segments/tree.py documents its JSON) is edited here; the server prints it as
 * rule text (POST /text), reads text back into a tree (POST /tree), counts and samples the rule
 * (POST /preview), saves it (POST /save) and answers the membership size over time (GET /sizes).
 * Errors come back with a `pointer` into the tree (shown next to that node) and a line and column
 * (shown under the text). Plain JavaScript, no dependencies, no build step.
 */
(function () {
  "use strict";

  var root = document.getElementById("builder");
  if (!root) return;
  var API = root.getAttribute("data-api") || "/console/api/builder";
  var DELAY = 350;

  var UNITS = ["second", "minute", "hour", "day", "week"];
  var FREQ = [[">=", "at least"], ["<=", "at most"], ["=", "exactly"], [">", "more than"], ["<", "fewer than"]];
  var FUNCS = [["count", "count of events"], ["sum", "sum of"], ["avg", "average of"], ["min", "minimum of"], ["max", "maximum of"],
    ["distinct_count", "distinct values of"], ["most_frequent", "most frequent"], ["first_time", "first time"], ["last_time", "last time"]];
  var PATH_FUNCS = ["sum", "avg", "min", "max", "distinct_count", "most_frequent"];
  var OPS = [["=", "="], ["!=", "≠"], ["<", "<"], ["<=", "≤"], [">", ">"], [">=", "≥"], ["contains", "contains"],
    ["starts_with", "starts with"], ["ends_with", "ends with"], ["matches", "matches (regex)"], ["in", "is one of"],
    ["not_in", "is none of"], ["between", "between"], ["is_set", "is set"], ["is_not_set", "is not set"]];
  var ARITY = { "in": [1, 1000], "not_in": [1, 1000], "between": [2, 2], "is_set": [0, 0], "is_not_set": [0, 0] };
  var KINDS = [["performed", "performed an event"], ["aggregate", "count or aggregate of events"], ["sequence", "sequence of events"],
    ["trait", "profile trait"], ["segment", "in another segment"], ["raw", "rule text"]];
  var VALUE_TYPES = ["string", "number", "boolean", "date", "datetime", "ago"];
  var TIME_TYPES = ["date", "datetime", "ago"];

  var el = {
    tree: document.getElementById("tree-root"),
    text: document.getElementById("rule-text"),
    textErrors: document.getElementById("text-errors"),
    treeNotice: document.getElementById("tree-notice"),
    count: document.getElementById("live-count"),
    sample: document.getElementById("live-sample"),
    previewStatus: document.getElementById("preview-status"),
    name: document.getElementById("seg-name"),
    description: document.getElementById("seg-description"),
    save: document.getElementById("seg-save"),
    status: document.getElementById("seg-status"),
    chart: document.getElementById("sizes-chart"),
    lists: document.getElementById("builder-lists")
  };

  var state = {
    tree: { version: 1, root: { kind: "group", op: "and", children: [] }, policy: null },
    source: "tree",       // which side was edited last: "tree" or "text"
    seq: 0,               // the latest request; older answers are dropped
    catalog: { events: {}, traits: {}, segments: [], computed_traits: [], event_fields: [] },
    valid: false,
    timer: null
  };

  // --- requests -------------------------------------------------------------------------------
  function csrfHeaders() {
    var headers = { "Content-Type": "application/json", "Accept": "application/json" };
    var meta = document.querySelector('meta[name="csrf-token"]');
    if (meta) headers["X-CSRF-Token"] = meta.getAttribute("content");
    return headers;
  }

  function call(method, path, body) {
    return fetch(API + path, {
      method: method, credentials: "same-origin", headers: csrfHeaders(),
      body: body === undefined ? undefined : JSON.stringify(body)
    }).then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (data) { return { ok: r.ok, status: r.status, data: data }; });
    });
  }

  // --- small DOM helpers ----------------------------------------------------------------------
  var uid = 0;
  function h(tag, attrs) {
    var node = document.createElement(tag);
    var a = attrs || {};
    Object.keys(a).forEach(function (k) {
      if (k === "text") node.textContent = a[k];
      else if (k.slice(0, 2) === "on") node.addEventListener(k.slice(2), a[k]);
      else if (a[k] !== null && a[k] !== undefined && a[k] !== false) node.setAttribute(k, a[k] === true ? "" : a[k]);
    });
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined) continue;
      (Array.isArray(c) ? c : [c]).forEach(function (x) { if (x) node.appendChild(typeof x === "string" ? document.createTextNode(x) : x); });
    }
    return node;
  }

  function idFor(pointer, what) {
    return ("b" + pointer + "-" + what).replace(/[^A-Za-z0-9]+/g, "-");
  }

  /* A labelled control: the label is visible and tied to the control by for/id. */
  function field(label, control, extraClass) {
    if (!control.id) control.id = "bf" + (++uid);
    return h("span", { "class": "bfield" + (extraClass ? " " + extraClass : "") }, h("label", { "for": control.id, text: label }), control);
  }

  function select(pointer, what, options, value, onchange) {
    var s = h("select", { id: idFor(pointer, what), "data-pointer": pointer + (what.charAt(0) === "@" ? "" : "/" + what) });
    options.forEach(function (o) {
      var opt = h("option", { value: o[0], text: o[1] });
      if (String(o[0]) === String(value)) opt.selected = true;
      s.appendChild(opt);
    });
    s.addEventListener("change", function () { onchange(s.value); changed(true); });
    return s;
  }

  function input(pointer, what, value, oninput, attrs) {
    var a = Object.assign({ type: "text", id: idFor(pointer, what), "data-pointer": pointer + "/" + what, autocomplete: "off" }, attrs || {});
    var i = h("input", a);
    i.value = value === null || value === undefined ? "" : String(value);
    i.addEventListener("input", function () { oninput(i.value); changed(false); });
    return i;
  }

  function button(label, onclick, extra) {
    return h("button", Object.assign({ type: "button", "class": "bbutton", onclick: function () { onclick(); changed(true); } }, extra || {}), label);
  }

  function numberOr(text) {
    var t = String(text).trim();
    if (t !== "" && isFinite(Number(t))) return Number(t);
    return text;
  }

  // --- the catalog: suggestions ---------------------------------------------------------------
  function datalist(id, names) {
    var existing = document.getElementById(id);
    if (existing) existing.parentNode.removeChild(existing);
    var dl = h("datalist", { id: id });
    names.forEach(function (n) { dl.appendChild(h("option", { value: n })); });
    el.lists.appendChild(dl);
    return id;
  }

  function propsList(eventName) {
    var cat = state.catalog;
    var names = {};
    var events = eventName && cat.events[eventName] ? [eventName] : Object.keys(cat.events);
    events.forEach(function (e) { Object.keys(cat.events[e] || {}).forEach(function (p) { names[p] = true; }); });
    (cat.event_fields || []).forEach(function (p) { names[p] = true; });
    var id = "dl-props-" + (eventName ? String(Object.keys(cat.events).indexOf(eventName)) : "all");
    if (!document.getElementById(id)) datalist(id, Object.keys(names).sort());
    return id;
  }

  function typeOf(path, eventName) {
    var cat = state.catalog;
    if (eventName === undefined) return (cat.traits || {})[path] || "string";
    if (path === "timestamp") return "timestamp";
    var evs = eventName && cat.events[eventName] ? [eventName] : Object.keys(cat.events);
    for (var i = 0; i < evs.length; i++) { var t = (cat.events[evs[i]] || {})[path]; if (t) return t; }
    return "string";
  }

  function defaultValue(kind) {
    if (kind === "number") return { type: "number", value: 0 };
    if (kind === "boolean") return { type: "boolean", value: true };
    if (kind === "timestamp") return { type: "date", value: new Date().toISOString().slice(0, 10) };
    return { type: "string", value: "" };
  }

  // --- new nodes --------------------------------------------------------------------------------
  function newCondition(kind) {
    var base = { kind: kind, negated: false, note: null };
    if (kind === "performed") return Object.assign(base, { event: "", where: null, frequency: { op: ">=", count: 1 }, window: null });
    if (kind === "aggregate") return Object.assign(base, { func: "count", path: null, event: "", where: null, op: ">=", values: [{ type: "number", value: 1 }], window: null });
    if (kind === "sequence") return Object.assign(base, { steps: [{ event: "", where: null }, { event: "", where: null }], within: { amount: 1, unit: "day" }, window: null });
    if (kind === "trait") return Object.assign(base, { path: "", op: "=", values: [{ type: "string", value: "" }] });
    if (kind === "segment") return Object.assign(base, { name: "" });
    return { kind: "raw", text: "", note: null };
  }

  function newCompare() { return { kind: "compare", path: "", op: "=", values: [{ type: "string", value: "" }], negated: false }; }

  // --- rendering --------------------------------------------------------------------------------
  function render() {
    var active = document.activeElement && document.activeElement.id;
    el.tree.textContent = "";
    el.tree.appendChild(renderGroup(state.tree.root, "/root", null, true));
    el.tree.appendChild(renderPolicy());
    if (active) {
      var again = document.getElementById(active);
      if (again && again !== document.activeElement) again.focus();
    }
  }

  function renderPolicy() {
    var p = state.tree.policy;
    var mode = p ? p.mode : "default";
    var wrap = h("div", { "class": "bpolicy", "data-pointer": "/policy" });
    wrap.appendChild(field("Count", select("/policy", "@mode", [["default", "profiles (default)"], ["profiles", "profiles (stated)"], ["persons", "persons joined by links"]], mode, function (v) {
      state.tree.policy = v === "default" ? null : v === "profiles" ? { mode: "profiles" } : { mode: "persons", threshold: 0.9 };
    })));
    if (p && p.mode === "persons") {
      wrap.appendChild(field("Link score above", input("/policy", "threshold", p.threshold, function (v) { p.threshold = numberOr(v); }, { inputmode: "decimal", size: 5 })));
    }
    wrap.appendChild(h("span", { "class": "node-error", role: "alert" }));
    return wrap;
  }

  function renderGroup(group, pointer, parent, isRoot) {
    var box = h("fieldset", { "class": "node group", "data-pointer": pointer });
    var legendText = isRoot ? "Members match" : "Group";
    box.appendChild(h("legend", { text: legendText }));
    var ops = isRoot ? [["and", "all of these"], ["or", "any of these"]] : [["and", "all of these"], ["or", "any of these"], ["not", "not this"]];
    var head = h("div", { "class": "node-head" });
    head.appendChild(field("Match", select(pointer, "@op", ops, group.op, function (v) {
      group.op = v;
      if (v === "not" && group.children.length > 1) group.children = [{ kind: "group", op: "and", children: group.children }];
    })));
    if (!isRoot) head.appendChild(button("Remove group", function () { removeFrom(parent, group); focusAfter(parentOf(pointer), "@op"); }, { "aria-label": "Remove this group" }));
    box.appendChild(head);
    box.appendChild(h("span", { "class": "node-error", role: "alert" }));
    var list = h("div", { "class": "children" });
    group.children.forEach(function (child, i) {
      var cp = pointer + "/children/" + i;
      list.appendChild(child.kind === "group" ? renderGroup(child, cp, group, false) : renderCondition(child, cp, group));
    });
    if (!group.children.length) list.appendChild(h("p", { "class": "hint", text: isRoot ? "No conditions yet: add one to start." : "This group is empty." }));
    box.appendChild(list);
    if (group.op !== "not" || group.children.length === 0) {
      box.appendChild(h("div", { "class": "node-actions" },
        button("Add condition", function () { group.children.push(newCondition("performed")); focusAfter(pointer + "/children/" + (group.children.length - 1), "@kind"); }),
        button("Add group", function () { group.children.push({ kind: "group", op: "or", children: [] }); focusAfter(pointer + "/children/" + (group.children.length - 1), "@op"); })));
    }
    return box;
  }

  var pendingFocus = null;
  function focusAfter(pointer, what) { pendingFocus = idFor(pointer, what); }

  /* The pointer of the group holding the node at `pointer` (where focus goes when the node is removed). */
  function parentOf(pointer) {
    return pointer.replace(/\/children\/\d+$/, "");
  }

  function removeFrom(parent, node) {
    var i = parent.children.indexOf(node);
    if (i >= 0) parent.children.splice(i, 1);
  }

  function renderCondition(node, pointer, parent) {
    var box = h("div", { "class": "node condition", "data-pointer": pointer, role: "group", "aria-label": "Condition" });
    var head = h("div", { "class": "node-head" });
    head.appendChild(field("Condition", select(pointer, "@kind", KINDS, node.kind, function (v) {
      if (v === node.kind) return;
      var fresh = newCondition(v);
      fresh.note = node.note;
      if (v !== "raw" && node.negated) fresh.negated = true;
      parent.children[parent.children.indexOf(node)] = fresh;
    })));
    if (node.kind !== "raw") {
      var neg = h("input", { type: "checkbox", id: idFor(pointer, "negated"), "data-pointer": pointer + "/negated" });
      neg.checked = !!node.negated;
      neg.addEventListener("change", function () { node.negated = neg.checked; changed(true); });
      head.appendChild(field("Not", neg, "bcheck"));
    }
    head.appendChild(button("Remove", function () { removeFrom(parent, node); focusAfter(parentOf(pointer), "@op"); }, { "aria-label": "Remove this condition" }));
    box.appendChild(head);
    var body = h("div", { "class": "node-body" });
    ({ performed: renderPerformed, aggregate: renderAggregate, sequence: renderSequence, trait: renderTrait, segment: renderSegment, raw: renderRaw })[node.kind](node, pointer, body);
    box.appendChild(body);
    box.appendChild(field("Note", input(pointer, "note", node.note, function (v) { node.note = v.trim() ? v : null; }, { "class": "note" }), "bnote"));
    box.appendChild(h("span", { "class": "node-error", role: "alert" }));
    return box;
  }

  function eventInput(node, pointer, label, allowAny) {
    return field(label, input(pointer, "event", node.event, function (v) { node.event = v === "" && allowAny ? null : v; },
      { list: datalist("dl-events", Object.keys(state.catalog.events)), placeholder: allowAny ? "any event" : "event name" }));
  }

  function renderPerformed(node, pointer, body) {
    body.appendChild(eventInput(node, pointer, "Event", true));
    var f = node.frequency || { op: ">=", count: 1 };
    node.frequency = f;
    body.appendChild(field("How often", select(pointer, "frequency", FREQ, f.op, function (v) { f.op = v; })));
    body.appendChild(field("Times", input(pointer, "count", f.count, function (v) { f.count = numberOr(v); }, { inputmode: "numeric", size: 4, "data-pointer": pointer + "/frequency" })));
    body.appendChild(renderWhere(node, pointer, node.event));
    body.appendChild(renderWindow(node, pointer));
  }

  function renderAggregate(node, pointer, body) {
    body.appendChild(field("Measure", select(pointer, "func", FUNCS, node.func, function (v) {
      node.func = v;
      if (PATH_FUNCS.indexOf(v) < 0) node.path = null; else if (!node.path) node.path = "";
    })));
    if (PATH_FUNCS.indexOf(node.func) >= 0) {
      body.appendChild(field("Property", input(pointer, "path", node.path, function (v) { node.path = v; }, { list: propsList(node.event), placeholder: "property" })));
    }
    body.appendChild(eventInput(node, pointer, "Of event", true));
    body.appendChild(renderWhere(node, pointer, node.event));
    body.appendChild(renderPredicate(node, pointer, function () { return node.func === "count" || node.func === "distinct_count" ? "number" : node.func.indexOf("_time") > 0 ? "timestamp" : typeOf(node.path || "", node.event); }));
    body.appendChild(renderWindow(node, pointer));
  }

  function renderSequence(node, pointer, body) {
    var steps = h("ol", { "class": "steps" });
    node.steps.forEach(function (step, i) {
      var sp = pointer + "/steps/" + i;
      var li = h("li", { "data-pointer": sp, "class": "node step" });
      li.appendChild(eventInput(step, sp, i === 0 ? "First event" : "Then event", false));
      li.appendChild(renderWhere(step, sp, step.event));
      if (node.steps.length > 2) li.appendChild(button("Remove step", function () { node.steps.splice(i, 1); }, { "aria-label": "Remove step " + (i + 1) }));
      li.appendChild(h("span", { "class": "node-error", role: "alert" }));
      steps.appendChild(li);
    });
    body.appendChild(steps);
    body.appendChild(button("Add step", function () { node.steps.push({ event: "", where: null }); }));
    var w = node.within;
    body.appendChild(field("Within", input(pointer, "within-amount", w.amount, function (v) { w.amount = numberOr(v); }, { inputmode: "decimal", size: 4, "data-pointer": pointer + "/within" })));
    body.appendChild(field("Unit", select(pointer, "within-unit", UNITS.map(function (u) { return [u, u + "s"]; }), w.unit, function (v) { w.unit = v; })));
    body.appendChild(renderWindow(node, pointer));
  }

  function renderTrait(node, pointer, body) {
    var names = Object.keys(state.catalog.traits || {}).concat(state.catalog.computed_traits || []);
    body.appendChild(field("Trait", input(pointer, "path", node.path, function (v) { node.path = v; }, { list: datalist("dl-traits", names), placeholder: "trait" })));
    body.appendChild(renderPredicate(node, pointer, function () { return typeOf(node.path || ""); }));
  }

  function renderSegment(node, pointer, body) {
    body.appendChild(field("Segment", input(pointer, "name", node.name, function (v) { node.name = v; }, { list: datalist("dl-segments", state.catalog.segments || []) })));
  }

  function renderRaw(node, pointer, body) {
    var t = h("textarea", { id: idFor(pointer, "text"), "data-pointer": pointer + "/text", rows: 3, cols: 50, spellcheck: "false" });
    t.value = node.text || "";
    t.addEventListener("input", function () { node.text = t.value; changed(false); });
    body.appendChild(field("Rule text (kept as written)", t));
  }

  function renderPredicate(node, pointer, kindOf) {
    var wrap = h("span", { "class": "predicate" });
    wrap.appendChild(field("Operator", select(pointer, "op", OPS, node.op, function (v) {
      node.op = v;
      var ar = ARITY[v] || [1, 1];
      while (node.values.length < ar[0]) node.values.push(defaultValue(kindOf()));
      if (node.values.length > ar[1]) node.values.length = ar[1];
    })));
    node.values.forEach(function (v, i) {
      wrap.appendChild(renderValue(v, pointer + "/values/" + i, VALUE_TYPES, (node.op === "between" ? (i ? "And" : "From") : "Value")));
      if ((node.op === "in" || node.op === "not_in") && node.values.length > 1) {
        wrap.appendChild(button("Remove value", function () { node.values.splice(i, 1); }, { "aria-label": "Remove value " + (i + 1) }));
      }
    });
    if (node.op === "in" || node.op === "not_in") wrap.appendChild(button("Add value", function () { node.values.push(defaultValue(kindOf())); }));
    return wrap;
  }

  function renderValue(value, pointer, types, label) {
    var wrap = h("span", { "class": "value", "data-pointer": pointer });
    wrap.appendChild(field(label + " type", select(pointer, "@type", types.map(function (t) { return [t, t === "ago" ? "time ago" : t]; }), value.type, function (t) {
      value.type = t;
      if (t === "boolean") value.value = true;
      else if (t === "ago") value.value = "7 days";
      else if (t === "date") value.value = new Date().toISOString().slice(0, 10);
      else if (t === "datetime") value.value = new Date().toISOString().slice(0, 19) + "Z";
      else if (t === "number") value.value = numberOr(value.value);
      else value.value = String(value.value === null || value.value === undefined ? "" : value.value);
    }), "btype"));
    if (value.type === "boolean") {
      wrap.appendChild(field(label, select(pointer, "@value", [["true", "true"], ["false", "false"]], String(value.value), function (v) { value.value = v === "true"; })));
    } else {
      var attrs = { "data-pointer": pointer, placeholder: value.type === "ago" ? "30 days" : value.type === "date" ? "2026-01-31" : "" };
      wrap.appendChild(field(label, input(pointer, "value", value.value, function (v) { value.value = value.type === "number" ? numberOr(v) : v; }, attrs)));
    }
    return wrap;
  }

  function renderWhere(node, pointer, eventName) {
    var wrap = h("div", { "class": "where" });
    if (!node.where) {
      wrap.appendChild(button("Add filter", function () {
        node.where = { kind: "group", op: "and", children: [newCompare()] };
        focusAfter(pointer + "/where/children/0", "path");
      }, { "aria-label": "Add a filter on the event's properties" }));
      return wrap;
    }
    wrap.appendChild(renderFilterGroup(node.where, pointer + "/where", null, eventName, function () { node.where = null; }));
    return wrap;
  }

  function renderFilterGroup(group, pointer, parent, eventName, removeSelf) {
    var box = h("fieldset", { "class": "node filter", "data-pointer": pointer });
    box.appendChild(h("legend", { text: parent ? "Filter group" : "Where" }));
    var head = h("div", { "class": "node-head" });
    head.appendChild(field("Match", select(pointer, "@op", parent ? [["and", "all of"], ["or", "any of"], ["not", "not"]] : [["and", "all of"], ["or", "any of"]], group.op, function (v) {
      group.op = v;
      if (v === "not" && group.children.length > 1) group.children = [{ kind: "group", op: "and", children: group.children }];
    })));
    head.appendChild(button(parent ? "Remove filter group" : "Remove filter", removeSelf || function () { removeFrom(parent, group); }));
    box.appendChild(head);
    box.appendChild(h("span", { "class": "node-error", role: "alert" }));
    group.children.forEach(function (c, i) {
      var cp = pointer + "/children/" + i;
      if (c.kind === "group") { box.appendChild(renderFilterGroup(c, cp, group, eventName, null)); return; }
      var row = h("div", { "class": "node compare", "data-pointer": cp });
      var neg = h("input", { type: "checkbox", id: idFor(cp, "negated"), "data-pointer": cp + "/negated" });
      neg.checked = !!c.negated;
      neg.addEventListener("change", function () { c.negated = neg.checked; changed(true); });
      row.appendChild(field("Not", neg, "bcheck"));
      row.appendChild(field("Property", input(cp, "path", c.path, function (v) { c.path = v; }, { list: propsList(eventName), placeholder: "property" })));
      row.appendChild(renderPredicate(c, cp, function () { return typeOf(c.path, eventName || null); }));
      row.appendChild(button("Remove", function () { removeFrom(group, c); focusAfter(pointer, "@op"); }, { "aria-label": "Remove this comparison" }));
      row.appendChild(h("span", { "class": "node-error", role: "alert" }));
      box.appendChild(row);
    });
    if (group.op !== "not" || !group.children.length) {
      box.appendChild(h("div", { "class": "node-actions" },
        button("Add comparison", function () { group.children.push(newCompare()); focusAfter(pointer + "/children/" + (group.children.length - 1), "path"); }),
        button("Add filter group", function () { group.children.push({ kind: "group", op: "or", children: [newCompare()] }); })));
    }
    return box;
  }

  function renderWindow(node, pointer) {
    var w = node.window;
    var kind = w ? w.kind : "all";
    var wp = pointer + "/window";
    var wrap = h("span", { "class": "window", "data-pointer": wp });
    wrap.appendChild(field("When", select(pointer, "window", [["all", "any time"], ["last", "in the last"], ["between", "between"], ["since", "since"], ["before", "before"]], kind, function (v) {
      var week = { type: "ago", value: "7 days" };
      if (v === "all") node.window = null;
      else if (v === "last") node.window = { kind: "last", amount: 30, unit: "day" };
      else if (v === "between") node.window = { kind: "between", start: { type: "ago", value: "30 days" }, end: week };
      else if (v === "since") node.window = { kind: "since", start: { type: "ago", value: "30 days" } };
      else node.window = { kind: "before", end: week };
    })));
    if (w && w.kind === "last") {
      wrap.appendChild(field("Amount", input(wp, "amount", w.amount, function (v) { w.amount = numberOr(v); }, { inputmode: "decimal", size: 4 })));
      wrap.appendChild(field("Unit", select(wp, "unit", UNITS.map(function (u) { return [u, u + "s"]; }), w.unit, function (v) { w.unit = v; })));
    } else if (w) {
      if (w.start) wrap.appendChild(renderValue(w.start, wp + "/start", TIME_TYPES, w.kind === "between" ? "From" : "Since"));
      if (w.end) wrap.appendChild(renderValue(w.end, wp + "/end", TIME_TYPES, w.kind === "between" ? "To" : "Before"));
    }
    return wrap;
  }

  // --- syncing --------------------------------------------------------------------------------
  function changed(structural) {
    state.source = "tree";
    if (structural) {
      render();
      if (pendingFocus) { var f = document.getElementById(pendingFocus); pendingFocus = null; if (f) f.focus(); }
    }
    schedule(syncFromTree);
  }

  function schedule(fn) {
    clearTimeout(state.timer);
    setStatus(el.previewStatus, "Updating…");
    state.timer = setTimeout(fn, DELAY);
  }

  function syncFromTree() {
    var seq = ++state.seq;
    if (!state.tree.root.children.length) {
      el.text.value = "";
      showErrors([], "");
      showPreview(null);
      setStatus(el.previewStatus, "Add a condition to see who matches.");
      return Promise.resolve();
    }
    return call("POST", "/text", { tree: state.tree, name: el.name.value || null }).then(function (r) {
      if (seq !== state.seq) return;
      if (!r.ok) return failed(r);
      if (document.activeElement !== el.text) el.text.value = r.data.text;
      showErrors(r.data.errors, r.data.text);
      state.valid = r.data.valid;
      if (r.data.valid) return preview(seq, r.data.text);
      invalid();
    });
  }

  function syncFromText() {
    var seq = ++state.seq;
    var text = el.text.value;
    return call("POST", "/tree", { text: text, name: el.name.value || null }).then(function (r) {
      if (seq !== state.seq) return;
      if (!r.ok) return failed(r);
      if (r.data.tree) {
        state.tree = r.data.tree;
        el.treeNotice.textContent = "";
        render();
      } else {
        el.treeNotice.textContent = "The rule text does not parse; the conditions show the last rule that did.";
      }
      showErrors(r.data.errors, text);
      state.valid = r.data.valid;
      if (r.data.valid) return preview(seq, text);
      invalid();
    });
  }

  function preview(seq, text) {
    setStatus(el.previewStatus, "Counting…");
    return call("POST", "/preview", { text: text, name: el.name.value || null, sample: 10 }).then(function (r) {
      if (seq !== state.seq) return;
      if (!r.ok) { showPreview(null); return failed(r); }
      showPreview(r.data);
    });
  }

  function invalid() {
    showPreview(null);
    setStatus(el.previewStatus, "Fix the errors shown to see who matches.");
  }

  function failed(r) {
    var d = r.data || {};
    if (d.errors) { showErrors(d.errors, el.text.value); setStatus(el.previewStatus, "The rule has errors."); return; }
    setStatus(el.previewStatus, (d.message || ("The server answered " + r.status)) + (d.fix ? " " + d.fix : ""));
  }

  function showPreview(data) {
    el.sample.textContent = "";
    if (!data) { el.count.textContent = "–"; root.setAttribute("data-count", ""); return; }
    el.count.textContent = String(data.count);
    root.setAttribute("data-count", String(data.count));
    data.sample.forEach(function (id) { el.sample.appendChild(h("li", {}, h("code", { text: id }))); });
    setStatus(el.previewStatus, data.count + " profile" + (data.count === 1 ? "" : "s") + " match now (" + (data.timings_ms.compile + data.timings_ms.run).toFixed(0) + " ms).");
  }

  function setStatus(node, text) { if (node) node.textContent = text; }

  // --- errors ---------------------------------------------------------------------------------
  function clearErrors() {
    Array.prototype.forEach.call(el.tree.querySelectorAll(".node-error"), function (n) { n.textContent = ""; });
    Array.prototype.forEach.call(el.tree.querySelectorAll("[aria-invalid]"), function (n) { n.removeAttribute("aria-invalid"); });
    Array.prototype.forEach.call(el.tree.querySelectorAll(".has-error"), function (n) { n.classList.remove("has-error"); });
    el.textErrors.textContent = "";
    el.text.removeAttribute("aria-invalid");
  }

  function nodeFor(pointer) {
    var p = pointer;
    while (p) {
      var found = el.tree.querySelector('[data-pointer="' + p.replace(/"/g, '\\"') + '"]');
      if (found) return found;
      p = p.slice(0, p.lastIndexOf("/"));
    }
    return null;
  }

  function showErrors(errors, text) {
    clearErrors();
    (errors || []).forEach(function (e) {
      var message = e.message + (e.fix ? " Fix: " + e.fix : "");
      if (e.pointer !== null && e.pointer !== undefined) {
        var target = nodeFor(e.pointer);
        if (target) {
          var holder = target.closest(".node") || target;
          var slot = holder.querySelector(":scope > .node-error") || holder.querySelector(".node-error");
          if (slot) slot.textContent = message;
          holder.classList.add("has-error");
          if (/^(INPUT|SELECT|TEXTAREA)$/.test(target.tagName)) target.setAttribute("aria-invalid", "true");
        }
      }
      if (e.line) {
        var lines = (text || "").split("\n");
        var line = lines[e.line - 1] || "";
        var width = Math.max(1, (e.end_line === e.line && e.end_column ? e.end_column : e.column + 1) - e.column);
        var caret = new Array(e.column).join(" ") + new Array(width + 1).join("^");
        var item = h("div", { "class": "text-error" },
          h("p", {}, "Line " + e.line + ", column " + e.column + ": " + message + " "),
          h("pre", { "aria-hidden": "true" }, line + "\n" + caret),
          h("button", { type: "button", "class": "bbutton", onclick: function () { selectRange(e.start, e.end); } }, "Show in the text"));
        el.textErrors.appendChild(item);
        el.text.setAttribute("aria-invalid", "true");
      } else if (!e.pointer) {
        el.textErrors.appendChild(h("p", { "class": "text-error" }, message));
      }
    });
  }

  function selectRange(start, end) {
    el.text.focus();
    el.text.setSelectionRange(start || 0, Math.max(end || 0, (start || 0) + 1));
  }

  // --- size over time -------------------------------------------------------------------------
  function loadSizes(name) {
    if (!name) return Promise.resolve();
    return call("GET", "/segments/" + encodeURIComponent(name) + "/sizes").then(function (r) {
      if (r.ok) drawSizes(r.data);
    });
  }

  function drawSizes(data) {
    var NS = "http://www.w3.org/2000/svg";
    el.chart.textContent = "";
    var pts = data.points.slice();
    if (!pts.length) { el.chart.appendChild(h("p", { text: "No runs yet: save the segment to compute its members." })); return; }
    pts.push({ at: data.now, size: data.size });
    var W = 480, H = 140, P = 28;
    var t0 = Date.parse(pts[0].at), t1 = Date.parse(pts[pts.length - 1].at);
    var max = Math.max.apply(null, pts.map(function (p) { return p.size; }).concat([1]));
    function x(t) { return P + (t1 > t0 ? (Date.parse(t) - t0) / (t1 - t0) : 1) * (W - 2 * P); }
    function y(v) { return H - P - (v / max) * (H - 2 * P); }
    var svg = document.createElementNS(NS, "svg");
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-labelledby", "sizes-title");
    var title = document.createElementNS(NS, "title");
    title.id = "sizes-title";
    title.textContent = "Members of " + data.segment + " over time: " + pts.length + " points, now " + data.size + ", at most " + max + ".";
    svg.appendChild(title);
    var d = "";
    pts.forEach(function (p, i) {
      // a step line: the size holds until the next change
      if (i) d += " L" + x(p.at).toFixed(1) + " " + y(pts[i - 1].size).toFixed(1);
      d += (i ? " L" : "M") + x(p.at).toFixed(1) + " " + y(p.size).toFixed(1);
    });
    var path = document.createElementNS(NS, "path");
    path.setAttribute("d", d);
    path.setAttribute("class", "sizes-line");
    svg.appendChild(path);
    [[0, H - P + 4, "0"], [0, P + 4, String(max)]].forEach(function (l) {
      var t = document.createElementNS(NS, "text");
      t.setAttribute("x", String(l[0] + 2)); t.setAttribute("y", String(l[1])); t.textContent = l[2];
      svg.appendChild(t);
    });
    [[P, pts[0].at, "start"], [W - P, data.now, "end"]].forEach(function (l) {
      var t = document.createElementNS(NS, "text");
      t.setAttribute("x", String(l[0])); t.setAttribute("y", String(H - 6)); t.setAttribute("text-anchor", l[2]);
      t.textContent = String(l[1]).slice(0, 16).replace("T", " ");
      svg.appendChild(t);
    });
    el.chart.appendChild(svg);
    var table = h("table", { "class": "visually-hidden" }, h("caption", { text: "Membership size over time" }),
      h("tr", {}, h("th", { text: "time" }), h("th", { text: "members" })));
    pts.slice(-20).forEach(function (p) { table.appendChild(h("tr", {}, h("td", { text: p.at }), h("td", { text: String(p.size) }))); });
    el.chart.appendChild(table);
  }

  // --- save -----------------------------------------------------------------------------------
  function save() {
    clearTimeout(state.timer);
    var name = el.name.value.trim();
    var body = { name: name, description: el.description.value || null };
    if (state.source === "text") body.text = el.text.value; else body.tree = state.tree;
    setStatus(el.status, "Saving…");
    return call("POST", "/save", body).then(function (r) {
      if (!r.ok) {
        var d = r.data || {};
        if (d.errors) showErrors(d.errors, el.text.value);
        setStatus(el.status, "Not saved: " + (d.message || r.status) + (d.fix ? " " + d.fix : ""));
        return;
      }
      setStatus(el.status, (r.data.created ? "Created " : "Saved ") + r.data.name + " (version " + r.data.version + ", " +
        (r.data.run ? r.data.run.runs && r.data.run.runs[0] ? r.data.run.runs[0].members + " members" : "run done" : "not run") + ").");
      root.setAttribute("data-saved", r.data.name);
      return loadSizes(r.data.name);
    });
  }

  // --- start ----------------------------------------------------------------------------------
  el.text.addEventListener("input", function () { state.source = "text"; schedule(syncFromText); });
  el.save.addEventListener("click", save);

  var initial = root.getAttribute("data-segment");
  call("GET", "/catalog").then(function (r) {
    if (r.ok) state.catalog = r.data;
    if (initial) {
      return call("GET", "/segments/" + encodeURIComponent(initial)).then(function (s) {
        if (!s.ok) { failed(s); render(); return; }
        el.name.value = s.data.name;
        el.description.value = s.data.description || "";
        el.text.value = s.data.text;
        if (s.data.tree) state.tree = s.data.tree;
        render();
        state.source = "text";
        showErrors(s.data.errors, s.data.text);
        if (s.data.valid) preview(++state.seq, s.data.text);
        return loadSizes(initial);
      });
    }
    render();
    setStatus(el.previewStatus, "Add a condition to see who matches.");
  });
})();
