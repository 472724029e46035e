// Model answers as markdown: headings, lists, tables, highlighted code with a copy button, and math.
//
// The answer is untrusted text. marked turns it into HTML with every raw HTML tag of the text escaped
// (shown as written, never parsed), images shown as links (nothing is loaded), and $...$, $$...$$,
// \(...\) and \[...\] handed to KaTeX, which writes MathML (no fonts, no style attributes). DOMPurify
// then keeps only the HTML and MathML elements such markdown makes, without any event handler,
// script, style, form or media element, and links open in a new tab without a referrer. Code blocks
// are highlighted by highlight.js from their text. The libraries are in vendor/ (LICENSES.md).
"use strict";

window.markdown = (() => {
  const escapeHtml = (text) => text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

  function tex(source, displayMode) {
    try {
      return katex.renderToString(source, {
        displayMode, output: "mathml", throwOnError: false, trust: false, strict: "ignore", maxExpand: 1000,
      });
    } catch {
      return `<code>${escapeHtml(source)}</code>`;
    }
  }

  // $$ x $$ or \[ x \] on lines of their own; $x$ (no space inside the dollars, no digit after the
  // closing one: "$5 and $10" stays text) or \( x \) within a line.
  const BLOCK = /^(?:\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\])[ \t]*(?:\n|$)/;
  const INLINE = /^(?:\$\$([^\n]+?)\$\$|\$(?![\s$])((?:\\.|[^\\$\n])*?[^\s\\$])\$(?!\d)|\\\(([\s\S]+?)\\\))/;
  const math = [
    {
      name: "blockMath", level: "block",
      start: (src) => src.match(/\$\$|\\\[/)?.index,
      tokenizer(src) {
        const m = BLOCK.exec(src);
        return m ? { type: "blockMath", raw: m[0], text: (m[1] ?? m[2]).trim() } : undefined;
      },
      renderer: (token) => `<div class="math">${tex(token.text, true)}</div>`,
    },
    {
      name: "inlineMath", level: "inline",
      start: (src) => src.match(/\$|\\\(/)?.index,
      tokenizer(src) {
        const m = INLINE.exec(src);
        if (!m) return undefined;
        return { type: "inlineMath", raw: m[0], text: (m[1] ?? m[2] ?? m[3]).trim(), display: m[1] !== undefined };
      },
      renderer: (token) => tex(token.text, token.display),
    },
  ];

  const parser = new marked.Marked({
    gfm: true,
    breaks: false,
    extensions: math,
    renderer: {
      html: (token) => escapeHtml(token.text ?? token.raw ?? ""),
      image: (token) => `<a href="${escapeHtml(token.href ?? "")}">${escapeHtml(token.text || token.href || "image")}</a>`,
    },
  });

  hljs.configure({ ignoreUnescapedHTML: true, throwUnescapedHTML: false });

  const PURIFY = {
    USE_PROFILES: { html: true, mathMl: true },
    FORBID_TAGS: ["style", "img", "svg", "video", "audio", "source", "picture", "iframe", "object", "embed",
      "form", "input", "button", "textarea", "select", "link", "meta", "base"],
    FORBID_ATTR: ["style", "srcset", "background", "poster"],
  };
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer nofollow");
    }
  });

  async function copyText(text) {
    if (navigator.clipboard?.writeText) return navigator.clipboard.writeText(text);
    const area = document.createElement("textarea"); // http on a LAN address: no Clipboard API
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "visually-hidden";
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    if (!ok) throw new Error("the browser refused to copy");
  }

  // Each code block: highlighted, under a bar with its language and a copy button.
  function decorateCode(root) {
    for (const code of root.querySelectorAll("pre > code")) {
      const pre = code.parentElement;
      const language = /\blanguage-([\w+#.-]+)/.exec(code.className)?.[1] ?? "";
      if (language && hljs.getLanguage(language)) hljs.highlightElement(code);
      else if (!language && code.textContent.length < 20000) hljs.highlightElement(code);
      const bar = document.createElement("div");
      bar.className = "code-bar";
      const label = document.createElement("span");
      label.textContent = language || code.result?.language || "";
      const button = document.createElement("button");
      button.type = "button";
      button.className = "copy secondary";
      button.textContent = "Copy";
      button.setAttribute("aria-label", "Copy the code");
      button.addEventListener("click", () => {
        copyText(code.textContent.replace(/\n$/, "")).then(
          () => { button.textContent = "Copied"; },
          () => { button.textContent = "Copy failed"; },
        ).finally(() => setTimeout(() => { button.textContent = "Copy"; }, 1500));
      });
      bar.append(label, button);
      const box = document.createElement("div");
      box.className = "code";
      pre.before(box);
      box.append(bar, pre);
    }
  }

  // `element` shows `text` as markdown (replacing what it showed); the white space marked leaves
  // between blocks goes, so the element's text is what it shows.
  function render(element, text) {
    element.innerHTML = DOMPurify.sanitize(parser.parse(text), PURIFY);
    for (const node of [...element.childNodes]) {
      if (node.nodeType === Node.TEXT_NODE && !node.textContent.trim()) node.remove();
    }
    decorateCode(element);
  }

  return { render, copyText };
})();
