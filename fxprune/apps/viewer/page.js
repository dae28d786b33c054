(function () {
  'use strict';
  var svg = document.getElementById('canvas'), vp = document.getElementById('viewport');
  var DATA = JSON.parse(document.getElementById('fx-data').textContent);
  var tip = document.getElementById('tip'), sel = document.getElementById('sel');
  var statusEl = document.getElementById('status'), q = document.getElementById('q');
  var k = 1, tx = 0, ty = 0, view = DATA.defaultView, pinned = null, hits = [], hit = -1, note = '';
  var edgesOf = {};
  Array.prototype.forEach.call(document.querySelectorAll('path.edge'), function (e) {
    [e.getAttribute('data-s'), e.getAttribute('data-t')].forEach(function (id) {
      (edgesOf[id] = edgesOf[id] || []).push(e);
    });
  });
  function esc(s) { return String(s).replace(/[&<>"]/g, function (c) {
    return {'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;'}[c]; }); }
  function pct(a, b) { return b ? Math.round(100 * a / b) + '%' : '-'; }
  function viewEl() { return document.getElementById('view-' + view); }
  function boxes() { return viewEl().querySelectorAll('g[data-k]'); }
  function apply() {
    vp.setAttribute('transform', 'translate(' + tx + ',' + ty + ') scale(' + k + ')');
    statusEl.textContent = (view === 'detail' ? 'Detail' : 'Blocks') + ' view \u00b7 ' + boxes().length +
      ' boxes \u00b7 zoom ' + Math.round(k * 100) + '%' + note;
  }
  function bboxOf(els) {
    var x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    els.forEach(function (el) {
      var m = el.transform.baseVal.consolidate().matrix, r = el.querySelector('rect.box');
      var x = m.e + r.x.baseVal.value, y = m.f + r.y.baseVal.value;
      x0 = Math.min(x0, x); y0 = Math.min(y0, y);
      x1 = Math.max(x1, x + r.width.baseVal.value); y1 = Math.max(y1, y + r.height.baseVal.value);
    });
    return {x: x0, y: y0, width: x1 - x0, height: y1 - y0};
  }
  function fitTo(b, maxK, topAlign) {
    var W = svg.clientWidth, H = svg.clientHeight, pad = 30;
    if (!isFinite(b.width)) return;
    k = Math.min((W - 2 * pad) / Math.max(b.width, 1), (H - 2 * pad) / Math.max(b.height, 1), maxK || 8);
    if (topAlign) {   // tall graphs: readable width, start at the inputs
      k = Math.min((W - 2 * pad) / Math.max(b.width, 1), maxK || 1);
      tx = (W - b.width * k) / 2 - b.x * k; ty = pad - b.y * k;
    } else {
      tx = (W - b.width * k) / 2 - b.x * k; ty = (H - b.height * k) / 2 - b.y * k;
    }
    apply();
  }
  function fitAll() { fitTo(viewEl().getBBox(), 2); }
  function initialView() {
    var b = viewEl().getBBox(), W = svg.clientWidth, H = svg.clientHeight;
    var kw = Math.min(1, (W - 60) / b.width);
    if (b.height * kw > H - 60) fitTo(b, 1, true); else fitTo(b, 1);
  }
  function zoomAt(mx, my, f) {
    var nk = Math.max(0.01, Math.min(8, k * f));
    tx = mx - (mx - tx) * nk / k; ty = my - (my - ty) * nk / k; k = nk; apply();
  }
  function centreOn(el, minK) {
    var b = bboxOf([el]), W = svg.clientWidth, H = svg.clientHeight;
    k = Math.max(k, minK || 0.8);
    tx = W / 2 - (b.x + b.width / 2) * k; ty = H / 2 - (b.y + b.height / 2) * k; apply();
  }
  function setView(v, keep) {
    if (!document.getElementById('view-' + v)) return;
    view = v; note = '';
    Array.prototype.forEach.call(document.querySelectorAll('.view'), function (g) {
      g.classList.toggle('on', g.id === 'view-' + v); });
    var r = document.getElementById('v-' + v); if (r) r.checked = true;
    clearFocus(); if (!keep) initialView();
    document.documentElement.setAttribute('data-fxprune-view', v);
    try { history.replaceState(null, '', '#view=' + v); } catch (e) { /* file:// in some browsers */ }
  }
  // --- highlighting
  function clearFocus() {
    svg.classList.remove('focus');
    Array.prototype.forEach.call(document.querySelectorAll('.hl'), function (e) {
      e.classList.remove('hl', 'cur'); });
    Array.prototype.forEach.call(document.querySelectorAll('.grp.on'), function (e) {
      e.classList.remove('on'); });
  }
  function focusGroups(gids, el) {
    clearFocus(); svg.classList.add('focus');
    var set = {};
    gids.forEach(function (g) {
      Array.prototype.forEach.call(viewEl().querySelectorAll('g[data-g~="' + g + '"]'), function (n) {
        set[n.id] = n; n.classList.add('hl'); });
    });
    if (el) { set[el.id] = el; el.classList.add('hl', 'cur');
      (edgesOf[el.id] || []).forEach(function (e) { e.classList.add('hl'); }); }
    Object.keys(set).forEach(function (id) {
      (edgesOf[id] || []).forEach(function (e) {
        if (set[e.getAttribute('data-s')] && set[e.getAttribute('data-t')]) e.classList.add('hl'); });
    });
    return Object.keys(set).map(function (id) { return set[id]; });
  }
  function groupsOf(el) {
    var g = el.getAttribute('data-g'); return g ? g.split(' ') : [];
  }
  // --- tooltip / details
  function groupLine(g) {
    var G = DATA.groups[g]; if (!G) return '';
    return '<div><span class="sw' + (G.frz ? ' frz' : '') + '" style="background-color:' + G.fill +
      ';border-color:' + G.stroke + '"></span> <span class="mono">' + esc(G.name) + '</span> ' +
      G.kept + '/' + G.size + ' (' + pct(G.kept, G.size) + ')' +
      (G.reasons.length ? '<div class="why">' + (G.blocked ? 'blocked: ' : 'frozen ' + G.frozen + ': ') +
       esc(G.reasons.join('; ')) + '</div>' : '') + '</div>';
  }
  function describe(el) {
    var key = el.getAttribute('data-k'), n = DATA.nodes[key], h = '', gs = groupsOf(el);
    if (n && !(view === 'blocks' && DATA.blocks[key])) {
      h += '<b>' + esc(n.l) + '</b>' + (n.l !== key ? ' <span class="mono">(' + esc(key) + ')</span>' : '');
      h += '<div>' + esc(n.op) + ' \u00b7 ' + esc(n.k) + (n.sh ? ' \u00b7 ' + n.sh.join('\u00d7') : '') + '</div>';
      n.ch.forEach(function (c) {
        h += '<div>dim ' + c[0] + ': <b>' + c[1] + ' \u2192 ' + c[2] + '</b> (' + pct(c[2], c[1]) + ' kept)</div>';
      });
      if (n.b) h += '<div class="mono">block: ' + esc(n.b) + '</div>';
    } else if (DATA.blocks[key]) {
      var B = DATA.blocks[key];
      h += '<b>' + esc(key) + '</b><div>' + B.m.length + ' ops collapsed (switch to Detail to see them)</div>';
      B.m.slice(0, 40).forEach(function (m) {
        var c = DATA.nodes[m]; if (!c) return;
        h += '<div class="mono">' + esc(c.l) + (c.ch.length ? ' ' + c.ch[0][1] + '\u2192' + c.ch[0][2] : '') + '</div>';
      });
      if (B.m.length > 40) h += '<div>\u2026</div>';
    }
    if (gs.length) {
      h += '<div style="margin-top:4px">' + (gs.length === 1 ? 'channel group:' : gs.length + ' channel groups:') + '</div>';
      gs.slice(0, 12).forEach(function (g) { h += groupLine(g); });
      if (gs.length > 12) h += '<div>\u2026 and ' + (gs.length - 12) + ' more</div>';
    }
    return h;
  }
  function nodeFrom(t) {
    while (t && t !== svg) { if (t.getAttribute && t.getAttribute('data-k') !== null && t.id) return t; t = t.parentNode; }
    return null;
  }
  var hovered = null;
  svg.addEventListener('mousemove', function (ev) {
    var el = nodeFrom(ev.target);
    if (!el || dragging) {
      tip.style.display = 'none';
      if (!el && hovered) { hovered = null; if (!pinned) clearFocus(); }
      return;
    }
    if (el !== hovered) {         // rebuild the tooltip and the highlight only when entering a box
      hovered = el; tip.innerHTML = describe(el);
      if (!pinned) focusGroups(groupsOf(el), el);
    }
    tip.style.display = 'block';
    var x = ev.clientX + 14, y = ev.clientY + 14, r = tip.getBoundingClientRect();
    if (x + r.width > window.innerWidth) x = ev.clientX - r.width - 10;
    if (y + r.height > window.innerHeight) y = Math.max(0, window.innerHeight - r.height - 4);
    tip.style.left = x + 'px'; tip.style.top = y + 'px';
  });
  svg.addEventListener('mouseleave', function () {
    hovered = null; tip.style.display = 'none'; if (!pinned) clearFocus(); });
  // --- pan and zoom
  var dragging = false, moved = false, px = 0, py = 0;
  svg.addEventListener('wheel', function (ev) {
    ev.preventDefault();
    if (ev.shiftKey) { ty -= ev.deltaY; tx -= ev.deltaX; apply(); return; }
    var r = svg.getBoundingClientRect();
    zoomAt(ev.clientX - r.left, ev.clientY - r.top, Math.exp(-ev.deltaY * (ev.deltaMode ? 0.05 : 0.0015)));
  }, {passive: false});
  svg.addEventListener('pointerdown', function (ev) {
    if (ev.button !== 0) return;
    dragging = true; moved = false; px = ev.clientX; py = ev.clientY;
  });
  window.addEventListener('pointermove', function (ev) {
    if (!dragging) return;
    var dx = ev.clientX - px, dy = ev.clientY - py;
    if (!moved && Math.abs(dx) + Math.abs(dy) < 4) return;
    if (!moved) { moved = true; svg.classList.add('dragging'); tip.style.display = 'none'; }
    tx += dx; ty += dy; px = ev.clientX; py = ev.clientY; apply();
  });
  window.addEventListener('pointerup', function (ev) {
    if (!dragging) return;
    dragging = false; svg.classList.remove('dragging');
    if (moved) return;
    var el = nodeFrom(ev.target);
    if (el) { pinned = el; focusGroups(groupsOf(el), el); sel.innerHTML = describe(el); sel.style.display = 'block'; }
    else { pinned = null; clearFocus(); sel.style.display = 'none'; }
  });
  window.addEventListener('keydown', function (ev) {
    if (ev.target === q) return;
    var W = svg.clientWidth, H = svg.clientHeight;
    if (ev.key === 'f') fitAll();
    else if (ev.key === '0') initialView();
    else if (ev.key === '+' || ev.key === '=') zoomAt(W / 2, H / 2, 1.25);
    else if (ev.key === '-') zoomAt(W / 2, H / 2, 0.8);
    else if (ev.key === 'ArrowDown' || ev.key === 'PageDown') { ty -= ev.key === 'PageDown' ? H * 0.9 : 60; apply(); }
    else if (ev.key === 'ArrowUp' || ev.key === 'PageUp') { ty += ev.key === 'PageUp' ? H * 0.9 : 60; apply(); }
    else if (ev.key === 'ArrowLeft') { tx += 60; apply(); }
    else if (ev.key === 'ArrowRight') { tx -= 60; apply(); }
    else if (ev.key === 'Escape') { pinned = null; clearFocus(); sel.style.display = 'none'; }
    else return;
    ev.preventDefault();
  });
  window.addEventListener('resize', apply);
  document.getElementById('b-fit').onclick = fitAll;
  document.getElementById('b-top').onclick = initialView;
  document.getElementById('b-in').onclick = function () { zoomAt(svg.clientWidth / 2, svg.clientHeight / 2, 1.25); };
  document.getElementById('b-out').onclick = function () { zoomAt(svg.clientWidth / 2, svg.clientHeight / 2, 0.8); };
  Array.prototype.forEach.call(document.querySelectorAll('input[name=view]'), function (r) {
    r.onchange = function () { setView(r.value); };
  });
  // --- legend: click a group to highlight its nodes and zoom to them
  Array.prototype.forEach.call(document.querySelectorAll('.grp'), function (row) {
    row.onclick = function () {
      var g = row.getAttribute('data-gid'), els = focusGroups([g]);
      row.classList.add('on'); pinned = row;
      if (els.length) fitTo(bboxOf(els), 1.2);
      else { note = ' \u00b7 group ' + DATA.groups[g].name + ' is not drawn in this view'; apply(); }
    };
  });
  // --- search: Enter jumps to the next box whose name contains the text
  function find(text) {
    var t = text.trim().toLowerCase(); if (!t) return;
    if (!hits.length || hits.t !== t || hits.view !== view) {
      hits = Array.prototype.filter.call(boxes(), function (el) {
        var key = el.getAttribute('data-k'), n = DATA.nodes[key];
        return key.toLowerCase().indexOf(t) >= 0 || (n && n.l.toLowerCase().indexOf(t) >= 0);
      });
      hits.t = t; hits.view = view; hit = -1;
    }
    if (!hits.length) { note = ' \u00b7 no box matches "' + text + '"'; apply(); return; }
    hit = (hit + 1) % hits.length;
    var el = hits[hit]; note = ' \u00b7 match ' + (hit + 1) + '/' + hits.length;
    pinned = el; focusGroups(groupsOf(el), el); centreOn(el, 0.9);
    sel.innerHTML = describe(el); sel.style.display = 'block';
  }
  q.addEventListener('keydown', function (ev) { if (ev.key === 'Enter') find(q.value); });
  var hash = location.hash;    // read once: setView rewrites it
  var m = /view=(detail|blocks)/.exec(hash);
  setView(m ? m[1] : view);
  var f = /focus=([^&]+)/.exec(hash);
  if (f) { q.value = decodeURIComponent(f[1]); find(q.value); }
  if (/(^#|&)fit(&|$)/.test(hash)) fitAll();
  document.documentElement.setAttribute('data-fxprune-ready', view);
})();
