// Swagger UI's start-up on /docs, a file rather than an inline script so that the page's CSP allows only
// scripts from this server. `window.ui` is Swagger UI's handle (tests use it).
"use strict";
const root = document.getElementById("swagger-ui");
window.ui = SwaggerUIBundle({
  url: root.dataset.openapiUrl,
  domNode: root,
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null, // the default shows a badge from validator.swagger.io, which is given this document's URL
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
